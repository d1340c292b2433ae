"""Automatic repairs during a move: the platform replaces VMs silently, the move goes on.

With `automaticRepairsPolicy` (Replace) the platform deletes a VM that reports unhealthy past
its grace period and creates a new one with a new name and instance id, without changing the
capacity and without an Event Grid event. The app's own new VM can be one of them (the grace
period, 30 minutes by default, is shorter than the 90-minute health timeout), and so can any
other VM of the set. Against armsim (armsim/repairs.py) and Azurite through the real clients.
"""

from __future__ import annotations

import pytest

from armsim import ScaleSetSpec, Scenario
from devkit.stack import Drive, running_stack
from rebalancer.cli import EXIT_OK, build_parser, status
from rebalancer.operation import Reason, State

ENABLED = {"zone-rebalance": "enabled"}
MODES = ["Uniform", "Flexible"]


def scenario(mode: str) -> Scenario:
    spec = ScaleSetSpec("web", "rg-web", mode=mode, counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED)
    return Scenario(scale_sets=(spec,))


def awaiting_health(run: Drive) -> bool:
    return [r.state for r in run.records()] == [State.AWAITING_HEALTH]


@pytest.mark.parametrize("mode", MODES)
def test_the_apps_new_vm_replaced_by_repairs_is_followed_to_its_replacement(
    store, azurite, table_prefix, capsys, mode
):
    with running_stack(scenario(mode), store) as stack:
        sim = stack.sim
        sim.repairs.enable("rg-web", "web", grace_period="PT10M")
        sim.actor.set_new_vm_health("rg-web", "web", "unhealthy")
        run = Drive(stack)
        run.until(lambda: bool(sim.repairs.repairs), ticks=60, what="the platform's repair")
        (repair,) = sim.repairs.repairs
        (record,) = run.records()
        assert record.kept == (repair.instance_id,)  # the app's own new VM was repaired
        sim.actor.set_new_vm_health("rg-web", "web", "healthy")
        run.until_settled()
        (record,) = run.records()
        assert record.state is State.SUCCEEDED, record.history
        assert record.kept == (repair.replacement,)
        assert {repair.instance_id, repair.replacement} <= set(record.created)
        assert Reason.REPAIR_REPLACED in {t.reason for t in record.history}
        assert len(run.app_deletes()) == 1  # the source only: nothing of ours deleted twice
        capsys.readouterr()
        args = build_parser().parse_args(
            ["status", "--table-prefix", table_prefix, "--scale-set", record.scale_set_id]
        )
        env = {"AzureWebJobsStorage": azurite.connection_string}
        assert status.run(args, env, now=sim.clock.now()) == EXIT_OK
        shown = " ".join(capsys.readouterr().out.split())
        assert "repair_replaced" in shown and "automaticRepairsPolicy.gracePeriod" in shown


@pytest.mark.parametrize("mode", MODES)
def test_a_repair_replacement_counts_only_once_it_reports_healthy_itself(store, mode):
    with running_stack(scenario(mode), store) as stack:
        sim = stack.sim
        sim.repairs.enable("rg-web", "web", grace_period="PT10M")
        sim.actor.set_new_vm_health("rg-web", "web", "unhealthy")
        run = Drive(stack)
        run.until(lambda: bool(sim.repairs.repairs), ticks=60, what="the platform's repair")
        sim.actor.set_new_vm_health("rg-web", "web", "initializing")
        run.until_terminal(ticks=400)
        (record,) = run.records()
        (repair,) = sim.repairs.repairs
        assert (record.state, record.outcome) == (State.ROLLED_BACK, Reason.ROLLBACK_DONE)
        assert Reason.HEALTH_TIMEOUT in {t.reason for t in record.history}
        assert record.sources == ()
        app = {c.instance_id for c in run.app_deletes()}
        assert app == {repair.replacement}  # the timed-out replacement, never a source
        run.check("at the end")


@pytest.mark.parametrize("mode", MODES)
def test_another_vm_replaced_by_repairs_mid_move_is_no_outside_actor(store, mode):
    with running_stack(scenario(mode), store) as stack:
        sim = stack.sim
        web = sim.scale_set("rg-web", "web")
        (other,) = (vm.instance_id for vm in web.vms if vm.zone == "1")
        sim.actor.set_health("rg-web", "web", other, "unhealthy")  # before the move starts
        sim.actor.set_new_vm_health("rg-web", "web", "initializing")
        run = Drive(stack)
        run.until(lambda: awaiting_health(run), ticks=20, what="the new VM awaited")
        sim.repairs.enable("rg-web", "web", grace_period="PT10M")
        run.until(lambda: bool(sim.repairs.repairs), ticks=10, what="the platform's repair")
        run.tick()
        (record,) = run.records()
        assert record.state is State.AWAITING_HEALTH, record.history
        (kept,) = record.kept
        sim.actor.set_health("rg-web", "web", kept, "healthy")
        run.until_terminal(ticks=40)
        (record,) = run.records()
        assert record.state is State.SUCCEEDED, record.history
        (repair,) = sim.repairs.repairs
        assert repair.instance_id == other
        assert record.repaired == {other: repair.replacement}
        assert repair.replacement not in record.created  # the platform's VM, not ours
        assert repair.replacement not in record.sources
        run.check("at the end")
