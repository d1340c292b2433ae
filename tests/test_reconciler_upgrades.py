"""Upgrades in progress: the app waits (`upgrade_in_progress`) as Azure's own zone balance does.

Against armsim (a rolling upgrade reimages the VMs in batches on its clock, and reports
RollingForward at `rollingUpgrades/latest`) and Azurite, through the real clients.
"""

from __future__ import annotations

import pytest

from armsim import ScaleSetSpec, Scenario, Timings
from devkit.stack import Drive, running_stack
from rebalancer.cli import EXIT_OK, build_parser, status
from rebalancer.operation import State

ENABLED = {"zone-rebalance": "enabled"}
MODES = ["Uniform", "Flexible"]
ROLLING = {"properties": {"upgradePolicy": {"mode": "Rolling"}}}


def scenario(mode: str, **options) -> Scenario:
    spec = ScaleSetSpec("web", "rg-web", mode=mode, counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED)
    return Scenario(scale_sets=(spec,), **options)


def latest_reads(stack) -> int:
    return sum(1 for r in stack.sim.requests if r.operation == "vmss.rolling_upgrade_latest")


@pytest.mark.parametrize("mode", MODES)
def test_a_rolling_upgrade_holds_the_move_until_it_completes(store, mode):
    with running_stack(scenario(mode), store) as stack:
        stack.sim.actor.update_scale_set("rg-web", "web", ROLLING)
        stack.sim.advance(30)
        upgrade = stack.sim.upgrades.start("rg-web", "web")
        run = Drive(stack)
        (result,) = run.tick()
        assert result.verdict is not None
        assert (result.verdict.decision, result.verdict.reason) == ("wait", "upgrade_in_progress")
        assert "RollingForward" in result.detail and "rollingUpgrades/latest" in result.detail
        run.until(lambda: upgrade.status == "Completed", ticks=60, what="the upgrade ends")
        assert run.records() == []  # nothing moved while VMs were reimaged
        assert upgrade.succeeded == 7
        run.until_settled()
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        assert run.records()[0].created_at >= upgrade.last_action_time
        run.check("at the end", settled=True)


@pytest.mark.parametrize("mode", MODES)
def test_a_manual_upgrade_policy_costs_no_rolling_upgrade_read(store, mode):
    with running_stack(scenario(mode), store) as stack:
        run = Drive(stack)
        run.until_settled()
        assert [r.state for r in run.records()] == [State.SUCCEEDED]
        assert latest_reads(stack) == 0


def test_someone_elses_model_change_waits_with_upgrade_in_progress(
    store, azurite, table_prefix, capsys
):
    with running_stack(scenario("Uniform", timings=Timings(update=600)), store) as stack:
        stack.sim.actor.set_tags("rg-web", "web", {**ENABLED, "owner": "team-web"})
        run = Drive(stack)
        (result,) = run.tick()
        assert result.verdict is not None
        assert (result.verdict.decision, result.verdict.reason) == ("wait", "upgrade_in_progress")
        assert "provisioningState is Updating" in result.detail
        assert latest_reads(stack) == 0  # the model says enough: no read
        assert run.records() == []
        capsys.readouterr()
        web = stack.sim.scale_set("rg-web", "web")
        args = build_parser().parse_args(
            ["status", "--table-prefix", table_prefix, "--scale-set", web.id]
        )
        env = {"AzureWebJobsStorage": azurite.connection_string}
        assert status.run(args, env, now=stack.sim.clock.now()) == EXIT_OK
        shown = " ".join(capsys.readouterr().out.split())
        assert "(upgrade_in_progress)" in shown and "provisioningState is Updating" in shown
