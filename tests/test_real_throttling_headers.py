"""Throttling headers recorded from real Azure, replayed through the budget and the adapter.

The recordings (tests/data/real-azure/throttling/) show today's header style: policy names
without a window, and `VmssQueuedVMOperations;0` on every write while the next writes were
accepted minutes later. The app must not hold a call where Azure accepted the next one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from armsim import SimCredential
from rebalancer import arm
from rebalancer.budget import Budget, CallKind, parse_remaining_header, reported_policy
from rebalancer.compute import ArmConfig, ComputeAdapter
from rebalancer.compute.pipeline import classify_request
from rebalancer.model import ScaleSetRef
from tests.answering import Answer, Answering, answer_through

DATA = Path(__file__).parent / "data" / "real-azure" / "throttling"
RECORDED = json.loads((DATA / "compute-ratelimit-headers.json").read_text())
BASE = "https://management.azure.com"
SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def responses(kind: str | None = None) -> list[dict[str, Any]]:
    """Every recorded response in recorded order, optionally only writes or reads."""
    found = [r for recording in RECORDED["recordings"] for r in recording["responses"]]
    if kind == "write":
        return [r for r in found if r["method"] != "GET"]
    if kind == "read":
        return [r for r in found if r["method"] == "GET"]
    return found


def seconds(response: dict[str, Any]) -> float:
    return parsedate_to_datetime(response["date"]).timestamp()


def test_the_recordings_are_in_todays_style_and_name_their_source() -> None:
    for recording in RECORDED["recordings"]:
        assert recording["repository"] == "Azure/azure-cli"
        assert len(recording["commit"]) == 40
    names = {
        name.rsplit("/", 1)[-1]
        for r in responses()
        for name in parse_remaining_header(r["headers"]["x-ms-ratelimit-remaining-resource"])
    }
    assert "VmssQueuedVMOperations" in names
    assert not any(name[-1].isdigit() or name.endswith("Min") for name in names)


def test_no_recorded_answer_holds_the_next_call() -> None:
    """Every recorded answer, fed to the budget as the app's pipeline does: no hold at all.

    Before, each write's `VmssQueuedVMOperations;0` held the next write about 48 s."""
    budget = Budget(share=0.2)
    start = seconds(responses()[0])
    for response in responses():
        kind, resource = classify_request(response["method"], BASE + response["path"])
        now = seconds(response) - start
        assert budget.reserve(kind, now, resource=resource).wait == 0.0, response["command"]
        hold = budget.observe_headers(kind, response["headers"], now, resource=resource)
        assert hold is None, (response["command"], response["headers"])


def test_recorded_policies_read_with_the_documented_limits() -> None:
    get = reported_policy("Microsoft.Compute/GetVMScaleSetResource")
    assert (get.budget, get.per_resource, get.burst, get.window) == (True, True, 36, 180.0)
    high = reported_policy("Microsoft.Compute/HighCostGetVMScaleSetSubscriptionMaximum")
    assert (high.per_resource, high.burst, high.window) == (False, 1080, 180.0)
    views = reported_policy("Microsoft.Compute/VMScaleSetVMViewsSubscriptionMaximum")
    assert (views.budget, views.burst, views.window) == (True, None, 180.0)
    assert not reported_policy("Microsoft.Compute/VmssQueuedVMOperations").budget


# -- through the adapter's transport ------------------------------------------------------


class ManualClock:
    """The adapter's clock, moved by the test; records every wait the adapter asks for."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.waits.append(seconds)
            self.now += seconds

    def sleep_until(self, deadline: float) -> None:
        self.sleep(deadline - self.now)


class Replay(Answering):
    """Answers the adapter's requests with the recorded headers, in recorded order: writes
    get the recorded writes' headers, VM lists the recorded list's. Bodies are minimal (the
    recordings' bodies are not kept): an empty VM page, a scale set with its location. Only
    the urllib3 pool under the adapter's transport is replaced (tests/answering.py)."""

    def __init__(self) -> None:
        super().__init__(self._answer)
        self.writes = iter(responses("write") * 10)
        self.list = next(r for r in responses("read") if r["path"].endswith("/virtualMachines"))
        self.sent: list[tuple[str, str]] = []

    def _answer(self, method: str, url: str, headers: Any, body: Any) -> Answer:
        self.sent.append((method, url))
        if method == "GET":
            recorded, content = self.list, b'{"value": []}'
        else:
            # A capacity PATCH is answered 200 with the scale set (as the PUT recorded here).
            recorded, content = next(self.writes), b'{"location": "westus"}'
        return (
            200,
            {
                **recorded["headers"],
                "Azure-AsyncOperation": (
                    f"{BASE}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Compute/locations"
                    "/westus/operations/replayed?api-version=2024-11-01"
                ),
            },
            content,
        )


class ReplayingAdapter(ComputeAdapter):
    def __init__(self, transport: Replay, clock: ManualClock) -> None:
        config = ArmConfig(subscription_id=SUBSCRIPTION, credential_scopes=(f"{BASE}/.default",))
        super().__init__(config, SimCredential(object_id="app", tenant_id="tenant"), clock=clock)
        self.transport = transport

    def _transport(self) -> Any:
        return answer_through(super()._transport(), self.transport)


def ref(name: str) -> ScaleSetRef:
    return ScaleSetRef.parse(
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg/providers/Microsoft.Compute"
        f"/virtualMachineScaleSets/{name}"
    )


@pytest.mark.parametrize("gap", [0.0, 127.0])
def test_a_wave_of_capacity_changes_is_not_held_by_the_recorded_headers(gap: float) -> None:
    """A pass that fixes several scale sets: one capacity change each, `gap` seconds apart
    (0: one invocation; 127 s: the recording's own spacing), then the same sets again."""
    clock, transport = ManualClock(), Replay()
    with ReplayingAdapter(transport, clock) as adapter:
        for name in ("web", "api", "jobs", "web", "api", "jobs"):
            call = adapter.set_capacity(ref(name), 7)
            assert call.status_code in (200, 202)
            clock.now += gap
    assert [method for method, _ in transport.sent] == ["PATCH"] * 6
    assert clock.waits == []


def test_reads_after_writes_are_not_held_either() -> None:
    """The product's inventory read (JSON through the adapter's pipeline) between writes."""
    clock, transport = ManualClock(), Replay()
    web = arm.parse_scale_set({"id": ref("web").id, "location": "westus", "zones": ["1", "2"]})
    with ReplayingAdapter(transport, clock) as adapter:
        adapter.set_capacity(web.ref, 7)
        adapter.read_inventory(web.ref, NOW, scale_set=web)
        adapter.read_inventory(web.ref, NOW, scale_set=web)
        adapter.set_capacity(web.ref, 6)
    assert clock.waits == []
    assert [classify_request(m, u)[0] for m, u in transport.sent] == [
        CallKind.SCALE_SET_UPDATE,
        CallKind.SCALE_SET_VM_LIST,
        CallKind.SCALE_SET_VM_LIST,
        CallKind.SCALE_SET_UPDATE,
    ]
