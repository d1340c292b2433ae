"""ArmConfig validation, its defaults for sovereign clouds, and the virtual-time clock."""

from __future__ import annotations

import threading

import pytest

from armsim import VirtualClock
from rebalancer.clock import VirtualTime
from rebalancer.compute import ArmConfig
from rebalancer.compute.credentials import StaticTokenCredential
from rebalancer.settings import load_settings

SUBSCRIPTION = "00000000-0000-4000-8000-000000000001"


def test_scopes_follow_the_endpoint() -> None:
    assert ArmConfig(SUBSCRIPTION).scopes == ("https://management.azure.com/.default",)
    china = ArmConfig(SUBSCRIPTION, endpoint="https://management.chinacloudapi.cn/")
    assert china.scopes == ("https://management.chinacloudapi.cn/.default",)
    assert not china.loopback
    assert ArmConfig(SUBSCRIPTION, endpoint="https://127.0.0.1:8443").loopback


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"endpoint": "http://management.azure.com"}, "https"),
        ({"budget_share": 0.0}, "share"),
        ({"audit_concurrency": 0}, "concurrency"),
        ({"max_wait": -1}, "max wait"),
    ],
)
def test_bad_configuration_names_the_problem(changes: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ArmConfig(SUBSCRIPTION, **changes)


def test_from_settings_takes_endpoint_and_share() -> None:
    settings = load_settings(
        {
            "REBALANCER_SUBSCRIPTION_ID": SUBSCRIPTION,
            "REBALANCER_ARM_ENDPOINT": "https://management.usgovcloudapi.net",
            "REBALANCER_ARM_BUDGET_SHARE": "0.1",
        }
    )
    config = ArmConfig.from_settings(settings, audit_concurrency=3)
    assert (config.endpoint, config.budget_share, config.audit_concurrency) == (
        "https://management.usgovcloudapi.net",
        0.1,
        3,
    )


def test_static_token_only_for_loopback() -> None:
    token = StaticTokenCredential("t", "https://localhost:1234").get_token("scope")
    assert token.token == "t"
    with pytest.raises(ValueError, match="loopback"):
        StaticTokenCredential("t", "https://management.azure.com")


def test_waits_for_slots_booked_together_end_at_the_latest_deadline() -> None:
    clock = VirtualClock()
    time = VirtualTime(clock)
    booked_at = time.monotonic()
    waits = (5.0, 3.0, 8.0)  # three callers booked slots at the same instant

    def wait(seconds: float) -> None:
        time.sleep_until(booked_at + seconds)

    threads = [threading.Thread(target=wait, args=(seconds,)) for seconds in waits]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert time.monotonic() == pytest.approx(8.0)
    time.sleep(0)
    time.sleep_until(2.0)
    assert time.monotonic() == pytest.approx(8.0)
    time.sleep(1.5)
    assert time.monotonic() == pytest.approx(9.5)
