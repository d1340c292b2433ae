"""Silent changes start the cooldown: VMs gone or new with no event and not by the app.

Repairs, upgrades, evictions and overprovision clean-up emit no Event Grid event. Against
armsim and Azurite through the real clients; the driver delivers no events, so a change made
in armsim between two passes is one the app did not see happen.
"""

from __future__ import annotations

import json

import pytest

from armsim import ScaleSetSpec, Scenario
from devkit.stack import Drive, running_stack
from rebalancer.operation import State

ENABLED = {"zone-rebalance": "enabled"}
MODES = ["Uniform", "Flexible"]


def scenario(mode: str, counts: dict[str, int]) -> Scenario:
    spec = ScaleSetSpec("web", "rg-web", mode=mode, counts=counts, tags=ENABLED)
    return Scenario(scale_sets=(spec,))


@pytest.mark.parametrize("mode", MODES)
def test_vms_gone_without_an_event_start_the_cooldown(store, mode):
    with running_stack(scenario(mode, {"1": 2, "2": 2, "3": 2}), store) as stack:
        run = Drive(stack)
        run.tick()  # balanced: the assessment remembers which VMs it saw
        web = stack.sim.scale_set("rg-web", "web")
        gone = [vm.instance_id for vm in web.vms if vm.zone == "1"]
        stack.sim.actor.delete_instances("rg-web", "web", gone)
        stack.sim.advance(120)  # the deletes finish before the app looks again
        (result,) = run.tick()
        assert result.verdict is not None
        assert (result.verdict.decision, result.verdict.reason) == ("wait", "cooldown")
        assert "not by the app" in result.detail
        names = [vm.name for vm in web.vms if vm.zone == "1"]
        ids = gone if mode == "Uniform" else names
        assert all(i in result.detail for i in ids)
        assert stack.store.last_activity(run.ref().key) is not None
        for _ in range(10):
            run.tick()
        assert run.records() == []
        saved = stack.store.last_assessment(run.ref().key)
        assert saved is not None and json.loads(saved.body)["reason"] == "cooldown"


@pytest.mark.parametrize("mode", MODES)
def test_the_apps_own_moves_do_not_start_the_cooldown(store, mode):
    # Two moves in a row: the VMs the first one created and deleted are the app's own, so
    # the second starts as soon as the first ends.
    with running_stack(scenario(mode, {"1": 0, "2": 3, "3": 3}), store) as stack:
        run = Drive(stack)
        run.until(lambda: len(run.records()) == 2 and run.idle(), what="two moves")
        assert [r.state for r in run.records()] == [State.SUCCEEDED, State.SUCCEEDED]
        assert stack.store.last_activity(run.ref().key) is None
        run.check("at the end", settled=True)


def test_a_change_the_app_saw_an_event_for_keeps_the_events_time(store):
    with running_stack(scenario("Uniform", {"1": 2, "2": 2, "3": 2}), store) as stack:
        run = Drive(stack)
        run.tick()
        web = stack.sim.scale_set("rg-web", "web")
        gone = [vm.instance_id for vm in web.vms if vm.zone == "1"]
        stack.sim.actor.delete_instances("rg-web", "web", gone)
        seen = stack.sim.clock.now()
        stack.store.record_activity(run.ref().key, seen)  # as the Event Grid trigger does
        stack.sim.advance(120)
        (result,) = run.tick()
        assert result.verdict is not None and result.verdict.reason == "cooldown"
        assert f"outside change at {seen.isoformat()}" in result.detail
        assert stack.store.last_activity(run.ref().key) == seen
