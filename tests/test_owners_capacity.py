"""Every operation hands the scale set back at its owners' capacity: no surplus VM of the app
stays, whatever the outcome (issue 14's four cases, through the Azure Functions entry points).

The driver checks the never-rules after every tick; `check(settled=True)` adds the capacity
rule of devkit/invariants.py: the capacity is the one at the start plus the outside changes
(armsim's capacity journal), plus the app's VMs the owners protected.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from armsim import ScaleSetSpec, Scenario, VmOverride, ZoneCapacity
from devkit.driver import FunctionsDriver
from devkit.stack import running_stack
from rebalancer import service
from rebalancer.operation import State

ENABLED = {"zone-rebalance": "enabled"}
LOCATION, SKU = "westeurope", "Standard_D2s_v5"


@pytest.fixture(autouse=True)
def _reset_runtime() -> Iterator[None]:
    service.forget_app_settings()
    yield
    service.forget_app_settings()


def run_for(run: FunctionsDriver, ticks: int) -> None:
    """Let the app work for a while, then until nothing is in flight; check at the end."""
    for _ in range(ticks):
        run.tick()
    run.until(run.idle, ticks=120, what="nothing in flight")
    run.flush()
    run.check("at the end", settled=True)


def test_flexible_own_vms_are_not_taken_for_protected_ones(store):
    """14/6/2 with 11 protected VMs in zone 1, no room in zone 3: each scale-out lands in
    zone 2 and is rolled back. The new VM's protection was never read, and it was taken for
    a protected one and left behind, one more after each backoff."""
    spec = ScaleSetSpec(
        "web",
        "rg-web",
        mode="Flexible",
        counts={"1": 14, "2": 6, "3": 2},
        tags=ENABLED,
        overrides=(VmOverride(zone="1", count=11, protect_from_scale_in=True),),
    )
    scenario = Scenario(scale_sets=(spec,), capacity=(ZoneCapacity(LOCATION, SKU, "3", 0),))
    with running_stack(scenario, store) as stack, FunctionsDriver(stack, seed=14) as run:
        run_for(run, ticks=480)  # four hours: the zone's backoff ends several times
        view = stack.sim.scale_set("rg-web", "web")
        assert view.capacity == 22
        assert len(view.vms) == 22
        assert all(r.state is not State.SUCCEEDED or r.kept for r in run.records())


def test_flexible_sources_are_found_without_protection_and_max_surge_3(store):
    """5/7/27, nothing protected, maxSurge 3: every source's protection is read, so the moves
    go through and the set ends balanced at its capacity of 39."""
    spec = ScaleSetSpec(
        "web", "rg-web", mode="Flexible", counts={"1": 5, "2": 7, "3": 27}, tags=ENABLED
    )
    with (
        running_stack(Scenario(scale_sets=(spec,)), store, max_surge="3") as stack,
        FunctionsDriver(stack, seed=15) as run,
    ):
        run.until_settled(ticks=400)
        view = stack.sim.scale_set("rg-web", "web")
        assert view.capacity == 39
        assert sorted(view.zone_counts().values()) == [13, 13, 13]
        assert all(r.state is State.SUCCEEDED for r in run.records())


def test_a_vm_deleted_by_a_person_mid_move_takes_the_apps_surplus_with_it(store):
    """Uniform 6/2: the app raises capacity 8 -> 9 (a new VM, plus an overprovisioned one
    Azure removes itself) and a person deletes VM 0, so capacity is 8 again. The owners now
    want 7: the app's new VM goes, and later moves start from 7."""
    spec = ScaleSetSpec("web", "rg-web", zones=("1", "2"), counts={"1": 6, "2": 2}, tags=ENABLED)
    with (
        running_stack(Scenario(scale_sets=(spec,)), store) as stack,
        FunctionsDriver(stack, seed=3) as run,
    ):
        run.until(lambda: bool(run.records()), what="the first operation")
        assert stack.sim.scale_set("rg-web", "web").capacity == 9
        stack.sim.actor.delete_vm("rg-web", "web", "0")
        run.until(lambda: run.records()[0].state.terminal, what="the first operation ended")
        first = run.records()[0]
        assert first.state is State.SUPERSEDED
        assert first.delete_requested and set(first.delete_requested) <= set(first.created)
        run.until_settled(ticks=300)
        view = stack.sim.scale_set("rg-web", "web")
        assert view.capacity == 7
        assert all(r.baseline.capacity == 7 for r in run.records()[1:])


def test_a_lower_capacity_written_mid_move_keeps_the_apps_vm(store):
    """Uniform 6/2 again, but this time someone writes capacity 7 while the move runs: Azure
    removes two VMs to meet it, which looks exactly like two deletes. The write event says
    which it was: an absolute capacity counts the app's new VM in, so the app deletes nothing
    and the scale set stays at the 7 its owners wrote (it used to roll back to 6)."""
    spec = ScaleSetSpec("web", "rg-web", zones=("1", "2"), counts={"1": 6, "2": 2}, tags=ENABLED)
    with (
        running_stack(Scenario(scale_sets=(spec,)), store) as stack,
        FunctionsDriver(stack, seed=3) as run,
    ):
        run.until(lambda: bool(run.records()), what="the first operation")
        assert stack.sim.scale_set("rg-web", "web").capacity == 9
        stack.sim.actor.set_capacity("rg-web", "web", 7)
        run.until(lambda: run.records()[0].state.terminal, what="the first operation ended")
        first = run.records()[0]
        assert (first.state, str(first.outcome)) == (State.SUPERSEDED, "capacity_changed")
        assert not first.delete_requested
        run.until_settled(ticks=300)
        assert stack.sim.scale_set("rg-web", "web").capacity == 7


def test_a_placement_tie_is_a_named_wait_not_a_zone_backoff(store):
    """Totals 4/6/4, active 4/4/3: the plan moves zone 2 -> zone 3, and Azure places the new
    VM in zone 1 (tied with zone 3 on totals). The VM is rightly not kept; zone 3 is not backed
    off (it has room), and the app waits under a named reason instead of retrying forever."""
    spec = ScaleSetSpec(
        "web",
        "rg-web",
        counts={"1": 4, "2": 6, "3": 4},
        tags=ENABLED,
        overrides=(
            VmOverride(zone="2", count=2, power_state="deallocated"),
            VmOverride(zone="3", count=1, power_state="deallocated"),
        ),
    )
    with (
        running_stack(Scenario(scale_sets=(spec,)), store) as stack,
        FunctionsDriver(stack, seed=4) as run,
    ):
        start = stack.sim.clock.now()
        run_for(run, ticks=240)  # two hours: a zone backoff would have ended and retried
        assert [r.state for r in run.records()] == [State.ROLLED_BACK]
        assert store.backoffs(start) == []  # none recorded at all
        verdict = json.loads(store.last_assessment(run.ids[("rg-web", "web")].lower()).body)
        assert (verdict["decision"], verdict["reason"]) == ("wait", "placement_tie")
        assert stack.sim.scale_set("rg-web", "web").capacity == 14


def test_a_capacity_written_while_the_delete_is_sent_wins(store, monkeypatch):
    """Uniform 6/2: the move's new VM is healthy, the app has chosen its source and reads it
    once more before the delete; at that moment someone writes capacity 8 (the owners' 8
    again), and Azure removes a VM to meet it. The delete must not go on top of that write:
    the scale set would end at 7 against its owners' 8. The app reads the capacity right
    before its delete, finds it changed, sends nothing, and the write's event ends the move
    `superseded`, every VM there now counted in."""
    spec = ScaleSetSpec(
        "web",
        "rg-web",
        zones=("1", "2"),
        counts={"1": 6, "2": 2},
        tags=ENABLED,
        # The app takes the unhealthy VM 0 as its source; Azure's default scale-in policy
        # removes the highest instance id of the fuller zone: two different VMs.
        overrides=(VmOverride(instance="0", health="unhealthy"),),
    )
    with (
        running_stack(Scenario(scale_sets=(spec,)), store) as stack,
        FunctionsDriver(stack, seed=3) as run,
    ):
        api = stack.sim.api
        handle = api.handle
        written: list[str] = []

        def outside_write_before_the_delete(request):
            # A single VM read outside the list and the instance views is the delete's own
            # protection read: the last request before Azure is asked to delete.
            single_vm = "/virtualmachinescalesets/web/virtualmachines/" in request.path.lower()
            last = request.path.rstrip("/").rsplit("/", 1)[-1].lower()
            if request.method == "GET" and single_vm and last.isdigit() and not written:
                written.append(last)
                stack.sim.actor.set_capacity("rg-web", "web", 8)
            return handle(request)

        monkeypatch.setattr(api, "handle", outside_write_before_the_delete)
        run_for(run, ticks=60)
        assert written, "the delete's own read never came"
        first = run.records()[0]
        assert (first.state, str(first.outcome)) == (State.SUPERSEDED, "capacity_changed")
        assert stack.sim.scale_set("rg-web", "web").capacity == 8
