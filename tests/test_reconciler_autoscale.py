"""Autoscale holds the capacity: a move that would pass the maximum is skipped with its reason.

Against armsim (whose autoscale engine puts a capacity above the maximum back on its next
evaluation) and Azurite, through the real clients. Without the check, every cooldown the app
would create a VM that autoscale takes back, and each operation would end superseded.
"""

from __future__ import annotations

import json

import pytest

from armsim import ScaleSetSpec, Scenario, Timings
from armsim.autoscale import EVALUATION_SECONDS
from devkit.stack import Drive, running_stack
from rebalancer.cli import EXIT_OK, build_parser, status
from rebalancer.model import ScaleSetRef
from rebalancer.operation import State
from rebalancer.verdict import Outcome

ENABLED = {"zone-rebalance": "enabled"}
MODES = ["Uniform", "Flexible"]


def scenario(mode: str, **options) -> Scenario:
    spec = ScaleSetSpec("web", "rg-web", mode=mode, counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED)
    return Scenario(scale_sets=(spec,), **options)


def app_capacity_writes(stack) -> list:
    app = stack.sim.scenario.app_principal_id
    return [
        r
        for r in stack.sim.requests
        if r.method == "PATCH" and r.principal_id == app and r.status < 400
    ]


@pytest.mark.parametrize("mode", MODES)
def test_a_scale_set_at_its_autoscale_maximum_is_skipped_and_never_scaled_out(
    store, azurite, table_prefix, capsys, mode
):
    # New VMs take five minutes to report healthy (an application starting), so autoscale's
    # next run finds the capacity above its maximum while a move waits for health.
    with running_stack(scenario(mode, timings=Timings(health=300)), store) as stack:
        web = stack.sim.scale_set("rg-web", "web")
        stack.sim.autoscale.put("rg-web", "web-autoscale", target=web.id, minimum=2, maximum=7)
        run = Drive(stack)
        for _ in range(20):  # ten virtual minutes: several autoscale evaluations
            run.tick()
        assert run.records() == []
        assert app_capacity_writes(stack) == []
        assert stack.sim.autoscale.actions == []
        result = run.results[-1]
        assert result.outcome is Outcome.ASSESSED
        assert result.verdict is not None
        assert (result.verdict.decision, result.verdict.reason) == ("skip", "autoscale_at_maximum")
        assert "web-autoscale" in result.detail and "at most 7 VMs" in result.detail
        saved = stack.store.last_assessment(ScaleSetRef.parse(web.id).key)
        assert saved is not None
        body = json.loads(saved.body)
        assert body["reason"] == "autoscale_at_maximum" and "web-autoscale" in body["detail"]
        run.check("at the end", settled=True)
        capsys.readouterr()
        args = build_parser().parse_args(
            ["status", "--table-prefix", table_prefix, "--scale-set", web.id]
        )
        env = {"AzureWebJobsStorage": azurite.connection_string}
        assert status.run(args, env, now=stack.sim.clock.now()) == EXIT_OK
        shown = " ".join(capsys.readouterr().out.split())
        assert "(autoscale_at_maximum)" in shown and "setting web-autoscale" in shown


@pytest.mark.parametrize("mode", MODES)
def test_room_under_the_maximum_lets_the_move_run(store, mode):
    with running_stack(scenario(mode), store) as stack:
        web = stack.sim.scale_set("rg-web", "web")
        stack.sim.autoscale.put(
            "rg-web", "web-autoscale", target=web.id.upper(), minimum=2, maximum=8
        )
        run = Drive(stack)
        run.until_settled()
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        assert stack.sim.autoscale.actions == []
        assert sorted(stack.counts("rg-web", "web").values()) == [2, 2, 3]


CPU_HIGH = {
    "metricTrigger": {
        "metricName": "Percentage CPU",
        "timeGrain": "PT1M",
        "statistic": "Average",
        "timeWindow": "PT5M",
        "timeAggregation": "Average",
        "operator": "GreaterThan",
        "threshold": 75.0,
        "dividePerInstance": False,
    },
    "scaleAction": {
        "direction": "Increase",
        "type": "ChangeCount",
        "value": "2",
        "cooldown": "PT5M",
    },
}


@pytest.mark.parametrize("mode", MODES)
def test_autoscale_scaling_out_on_its_rule_mid_move_supersedes_it_and_nothing_is_deleted(
    store, mode
):
    with running_stack(scenario(mode), store) as stack:
        web = stack.sim.scale_set("rg-web", "web")
        stack.sim.autoscale.put(
            "rg-web", "web-autoscale", target=web.id, minimum=2, maximum=20, rules=(CPU_HIGH,)
        )
        run = Drive(stack)
        run.until(lambda: bool(run.records()) and run.records()[-1].state is State.AWAITING_HEALTH)
        stack.sim.autoscale.set_metric(web.id, "Percentage CPU", 95.0)
        stack.sim.advance(EVALUATION_SECONDS)  # the engine evaluates before the app looks again
        run.until(run.idle, what="the operation ends")
        (record,) = run.records()
        assert record.state is State.SUPERSEDED
        (action,) = stack.sim.autoscale.actions
        assert (action.old_capacity, action.new_capacity) == (8, 10)
        assert run.app_deletes() == []
        run.check("at the end", settled=True)
