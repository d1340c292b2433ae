"""`rebalancer audit`: argument handling that needs no endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rebalancer.cli import main
from rebalancer.cli.audit import EXIT_CODES, default_subscription


def test_subscription_from_environment_then_azure_cli_profile(tmp_path: Path) -> None:
    assert default_subscription({"AZURE_SUBSCRIPTION_ID": " abc "}) == "abc"
    assert default_subscription({"REBALANCER_SUBSCRIPTION_ID": "def"}) == "def"
    profile = {
        "subscriptions": [
            {"id": "other", "isDefault": False},
            {"id": "11111111-2222-3333-4444-555555555555", "isDefault": True},
        ]
    }
    (tmp_path / "azureProfile.json").write_text("\ufeff" + json.dumps(profile), encoding="utf-8")
    assert default_subscription({"AZURE_CONFIG_DIR": str(tmp_path)}) == (
        "11111111-2222-3333-4444-555555555555"
    )
    assert default_subscription({"AZURE_CONFIG_DIR": str(tmp_path / "missing")}) is None


def test_no_subscription_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("AZURE_SUBSCRIPTION_ID", "REBALANCER_SUBSCRIPTION_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_CONFIG_DIR", str(tmp_path))
    assert main(["audit"]) == 2
    assert "--subscription" in capsys.readouterr().err


def test_static_token_is_refused_for_a_remote_endpoint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REBALANCER_ARM_STATIC_TOKEN", "test")
    code = main(["audit", "--subscription", "s", "--arm-endpoint", "https://management.azure.com"])
    assert code == 2
    assert "loopback" in capsys.readouterr().err


def test_plain_http_endpoint_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--subscription", "s", "--arm-endpoint", "http://127.0.0.1:1"]) == 2
    assert "https" in capsys.readouterr().err


def test_exit_codes_are_distinct_and_documented() -> None:
    assert sorted(EXIT_CODES) == list(range(9))
    documented = (Path(__file__).parent.parent / "docs" / "audit-command.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in documented
