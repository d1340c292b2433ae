"""`rebalancer audit`: argument handling, then the report and its errors against armsim."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from armsim import ArmSim, FaultRule, ScaleSetSpec, Scenario
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


# --- against armsim -----------------------------------------------------------------------

MIXED = (
    ScaleSetSpec("balanced", "rg-a", counts={"1": 2, "2": 2, "3": 2}),
    ScaleSetSpec(
        "tilted", "rg-a", counts={"1": 1, "2": 3, "3": 3}, tags={"zone-rebalance": "enabled"}
    ),
    ScaleSetSpec(
        "flex",
        "rg-b",
        mode="Flexible",
        counts={"1": 3, "2": 1},
        zones=("1", "2"),
        tags={"Zone-Rebalance": "Disabled"},
    ),
    ScaleSetSpec(
        "platform", "rg-b", counts={"1": 1, "2": 3}, zones=("1", "2"), platform_rebalancing=True
    ),
    ScaleSetSpec(
        "unmonitored",
        "rg-b",
        counts={"1": 0, "2": 2},
        zones=("1", "2"),
        health_monitoring="none",
        tags={"zone-rebalance": "audit"},
    ),
    ScaleSetSpec("regional", "rg-a", zones=(), counts={"": 2}),
)


def audit_json(
    sim: ArmSim, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, dict | None, str]:
    code = main(
        [
            "audit",
            "--subscription",
            sim.subscription_id,
            "--arm-endpoint",
            sim.endpoint,
            "--ca-cert",
            str(sim.ca_cert_path),
            "--json",
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


@pytest.fixture
def static_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBALANCER_ARM_STATIC_TOKEN", "test-token")
    monkeypatch.delenv("REBALANCER_DEFAULT_OPT_IN", raising=False)


@pytest.mark.integration
@pytest.mark.usefixtures("static_token")
def test_json_report_of_a_mixed_subscription(capsys: pytest.CaptureFixture[str]) -> None:
    with ArmSim.start(Scenario(scale_sets=MIXED, page_size=2)) as sim:
        code, report, err = audit_json(sim, capsys)
    assert code == 0, err
    assert report is not None
    assert report["subscription"] == sim.subscription_id
    by_name = {entry["id"].rsplit("/", 1)[1]: entry for entry in report["scaleSets"]}
    assert list(by_name) == ["balanced", "tilted", "flex", "platform", "unmonitored"]
    assert set(by_name["tilted"]) == {
        "id",
        "balanced",
        "zones",
        "decision",
        "reason",
        "mode",
        "moves",
    }

    assert by_name["balanced"] | {"id": ""} == {
        "id": "",
        "balanced": True,
        "zones": {z: {"total": 2, "active": 2} for z in ("1", "2", "3")},
        "decision": "none",
        "reason": "balanced",
        "mode": "audit",
        "moves": [],
    }
    tilted = by_name["tilted"]
    assert (tilted["balanced"], tilted["decision"], tilted["reason"], tilted["mode"]) == (
        False,
        "move",
        "moves_planned",
        "enabled",
    )
    assert len(tilted["moves"]) == 1 and tilted["moves"][0]["toZone"] == "1"
    assert tilted["moves"][0]["source"] in {
        vm.instance_id for vm in sim.scale_set("rg-a", "tilted").vms
    }

    flex = by_name["flex"]
    assert flex["mode"] == "disabled"
    assert flex["zones"] == {"1": {"total": 3, "active": 3}, "2": {"total": 1, "active": 1}}
    assert flex["decision"] == "move"
    assert flex["moves"][0]["fromZone"] == "1" and flex["moves"][0]["source"].startswith("flex")

    assert (by_name["platform"]["decision"], by_name["platform"]["reason"]) == (
        "skip",
        "platform_rebalancing",
    )
    assert (by_name["unmonitored"]["decision"], by_name["unmonitored"]["reason"]) == (
        "skip",
        "no_health_monitoring",
    )
    assert by_name["unmonitored"]["mode"] == "audit"


@pytest.mark.integration
@pytest.mark.usefixtures("static_token")
def test_table_output_and_resource_group_scope(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with ArmSim.start(Scenario(scale_sets=MIXED)) as sim:
        code = main(
            [
                "audit",
                "--subscription",
                sim.subscription_id,
                "--arm-endpoint",
                sim.endpoint,
                "--ca-cert",
                str(sim.ca_cert_path),
                "--resource-group",
                "RG-A",
                "--default-opt-in",
                "enabled",
            ]
        )
    out = capsys.readouterr().out
    assert code == 0
    assert "tilted" in out and "balanced" in out and "moves_planned" in out
    assert "flex" not in out and "platform" not in out


@pytest.mark.integration
@pytest.mark.usefixtures("static_token")
@pytest.mark.parametrize(
    ("rule", "exit_code", "words"),
    [
        (
            FaultRule(
                "error",
                operation="vmss.list_all",
                status=403,
                code="AuthorizationFailed",
                message="The client 'x' with object id 'x' does not have authorization "
                "to perform action 'Microsoft.Compute/virtualMachineScaleSets/read' over "
                "scope '/subscriptions/x' or the scope is invalid.",
            ),
            4,
            ("Microsoft.Compute/virtualMachineScaleSets/read", "Reader"),
        ),
        (
            FaultRule(
                "error",
                operation="vmss.list_all",
                status=401,
                code="InvalidAuthenticationToken",
                message="The access token is invalid.",
            ),
            3,
            ("az login",),
        ),
        (
            FaultRule("throttle", operation="vmss.list_all", retry_after=1200, count=None),
            6,
            ("1200 s",),
        ),
        (
            FaultRule(
                "error",
                operation="vmss.list_all",
                status=401,
                code="InvalidAuthenticationTokenTenant",
                message="The access token is from the wrong issuer.",
            ),
            5,
            ("az login --tenant",),
        ),
    ],
)
def test_listing_failures_exit_with_their_code(
    capsys: pytest.CaptureFixture[str], rule: FaultRule, exit_code: int, words: tuple[str, ...]
) -> None:
    with ArmSim.start(Scenario(scale_sets=MIXED, faults=(rule,))) as sim:
        code, report, err = audit_json(sim, capsys, "--max-wait", "5")
    assert code == exit_code, err
    assert report is None
    assert err.startswith("rebalancer audit: ") and err.count("\n") == 1
    for word in words:
        assert word in err


@pytest.mark.integration
@pytest.mark.usefixtures("static_token")
def test_unknown_subscription(capsys: pytest.CaptureFixture[str]) -> None:
    with ArmSim.start(Scenario(scale_sets=MIXED)) as sim:
        code = main(
            [
                "audit",
                "--subscription",
                "11111111-2222-3333-4444-555555555555",
                "--arm-endpoint",
                sim.endpoint,
                "--ca-cert",
                str(sim.ca_cert_path),
            ]
        )
    assert code == 5
    assert "11111111-2222-3333-4444-555555555555 was not found" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.usefixtures("static_token")
def test_unreachable_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(
        [
            "audit",
            "--subscription",
            "s",
            "--arm-endpoint",
            f"https://127.0.0.1:{port}",
            "--max-wait",
            "0",
        ]
    )
    assert code == 7
    assert f"cannot reach the ARM endpoint https://127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.usefixtures("static_token")
def test_a_set_that_cannot_be_read_is_reported_beside_the_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rule = FaultRule(
        "error",
        operation="vmss_vm.list",
        target="/tilted",
        status=403,
        code="AuthorizationFailed",
        message="no read on VMs",
        count=None,
    )
    with ArmSim.start(Scenario(scale_sets=MIXED, faults=(rule,))) as sim:
        code, report, _ = audit_json(sim, capsys)
    assert code == 1
    assert report is not None
    assert [e["id"].rsplit("/", 1)[1] for e in report["errors"]] == ["tilted"]
    assert report["errors"][0]["kind"] == "forbidden"
    assert len(report["scaleSets"]) == 4


@pytest.mark.integration
@pytest.mark.usefixtures("static_token")
def test_the_table_reads_in_an_80_column_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with ArmSim.start(Scenario(scale_sets=MIXED)) as sim:
        code = main(
            [
                "audit",
                "--subscription",
                sim.subscription_id,
                "--arm-endpoint",
                sim.endpoint,
                "--ca-cert",
                str(sim.ca_cert_path),
            ]
        )
    out = capsys.readouterr().out
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out, out
    for whole in ("unmonitored", "moves_planned", "platform_rebalancing", "no_health_monitoring"):
        assert whole in out, (whole, out)
    for header in ("scale set", "opt-in", "decision", "reason"):
        assert header in out.replace("\n", " "), header
    assert "Not shown at 80 columns: mode, balanced, moves" in out
    assert "5 zonal scale set(s) in the table; 1 not zonal" in out


@pytest.mark.integration
def test_a_loopback_endpoint_without_a_credential_names_the_static_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("REBALANCER_ARM_STATIC_TOKEN", raising=False)
    for name in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "IDENTITY_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_CONFIG_DIR", str(tmp_path))  # no az login here
    with ArmSim.start(Scenario(scale_sets=MIXED)) as sim:
        code, report, err = audit_json(sim, capsys, "--max-wait", "0")
    assert code == 3, err
    assert report is None
    assert "REBALANCER_ARM_STATIC_TOKEN" in err and err.count("\n") == 1


@pytest.mark.integration
@pytest.mark.usefixtures("static_token")
def test_a_move_over_the_autoscale_maximum_is_reported_as_a_skip_naming_the_setting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with ArmSim.start(Scenario(scale_sets=MIXED[:2])) as sim:
        tilted = sim.scale_set("rg-a", "tilted").id
        sim.autoscale.put("rg-a", "tilted-autoscale", target=tilted.lower(), minimum=1, maximum=7)
        code, report, err = audit_json(sim, capsys)
        assert code == 0, err
        assert report is not None
        entry = next(e for e in report["scaleSets"] if e["id"] == tilted)
        assert (entry["decision"], entry["reason"]) == ("skip", "autoscale_at_maximum")
        assert "tilted-autoscale" in entry["detail"] and "at most 7 VMs" in entry["detail"]
        assert len(entry["moves"]) == 1  # what it would move with room under the maximum
        assert (
            main(
                [
                    "audit",
                    "--subscription",
                    sim.subscription_id,
                    "--arm-endpoint",
                    sim.endpoint,
                    "--ca-cert",
                    str(sim.ca_cert_path),
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "autoscale_at_maximum" in out and "tilted-autoscale" in out


@pytest.mark.integration
@pytest.mark.usefixtures("static_token")
def test_a_rolling_upgrade_waits_and_automatic_repairs_are_explained(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with ArmSim.start(Scenario(scale_sets=MIXED[:2])) as sim:
        tilted = sim.scale_set("rg-a", "tilted").id
        rolling = {"properties": {"upgradePolicy": {"mode": "Rolling"}}}
        sim.actor.update_scale_set("rg-a", "tilted", rolling)
        sim.advance(30)
        sim.upgrades.start("rg-a", "tilted")
        sim.repairs.enable("rg-a", "tilted", grace_period="PT10M")
        code, report, err = audit_json(sim, capsys)
        assert code == 0, err
        assert report is not None
        entry = next(e for e in report["scaleSets"] if e["id"] == tilted)
        assert (entry["decision"], entry["reason"]) == ("wait", "upgrade_in_progress")
        assert "RollingForward" in entry["detail"] and "rolling-upgrade cancel" in entry["detail"]
        repairs = entry["automaticRepairs"]
        assert (repairs["repairAction"], repairs["gracePeriodMinutes"]) == ("Replace", 10)
        assert "raise automaticRepairsPolicy.gracePeriod" in repairs["note"]
        assert all("automaticRepairs" not in e for e in report["scaleSets"] if e["id"] != tilted)
        argv = ["audit", "--subscription", sim.subscription_id, "--arm-endpoint", sim.endpoint]
        assert main([*argv, "--ca-cert", str(sim.ca_cert_path)]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "tilted: upgrade_in_progress: a rolling upgrade is RollingForward" in out
        assert "tilted: automatic repairs: automaticRepairsPolicy Replace" in out


@pytest.mark.usefixtures("static_token")
def test_spot_mix_instance_mix_and_standby_pools_are_reported_with_what_changes_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from armsim import VmOverride

    flexible = {"mode": "Flexible", "counts": {"1": 1, "2": 1, "3": 4}}
    sets = (
        ScaleSetSpec(
            "mixed",
            "rg-a",
            priority="Spot",
            base_regular_priority_count=3,
            overrides=(
                VmOverride(zone="1", priority="Spot"),
                VmOverride(zone="2", priority="Spot"),
                VmOverride(zone="3", count=4, priority="Regular"),
            ),
            **flexible,
        ),
        ScaleSetSpec("sizes", "rg-a", vm_sizes=("Standard_D2s_v5", "Standard_D4s_v5"), **flexible),
        ScaleSetSpec("pooled", "rg-a", standby={"1": 2}, **flexible),
    )
    with ArmSim.start(Scenario(scale_sets=sets)) as sim:
        code, report, err = audit_json(sim, capsys)
        assert code == 0, err
        assert report is not None
        found = {e["id"].rsplit("/", 1)[-1]: e for e in report["scaleSets"]}
        assert (found["mixed"]["decision"], found["mixed"]["reason"]) == (
            "skip",
            "spot_priority_mix",
        )
        assert "changed priorityMixPolicy" in found["mixed"]["detail"]
        assert found["sizes"]["reason"] == "instance_mix"
        assert "single VM size" in found["sizes"]["detail"]
        assert found["pooled"]["reason"] == "standby_pool"
        assert found["pooled"]["zones"]["1"]["total"] == 1  # the pool VMs are not counted
        assert "detach the standby pool" in found["pooled"]["detail"]
