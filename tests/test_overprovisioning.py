"""Uniform overprovisioning (Azure's default): a scale-out creates extra VMs, shown Creating
then Deleting, that use up instance ids and go once the requested ones succeeded. A move
completes as without them, and the scale set ends at its owners' capacity (issue 15, item 1),
through the Azure Functions entry points."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from armsim import ScaleSetSpec, Scenario
from devkit.driver import FunctionsDriver
from devkit.stack import running_stack
from rebalancer import service
from rebalancer.operation import State

ENABLED = {"zone-rebalance": "enabled"}


@pytest.fixture(autouse=True)
def _reset_runtime() -> Iterator[None]:
    service.forget_app_settings()
    yield
    service.forget_app_settings()


@pytest.mark.parametrize("max_surge", ["1", "3"])
def test_moves_complete_with_overprovisioning(store, max_surge):
    """6/2/1 with overprovision on: every operation succeeds, the extras Azure created and
    removed are nobody's outside change, and the set ends balanced at its capacity of 9."""
    spec = ScaleSetSpec("web", "rg-web", counts={"1": 6, "2": 2, "3": 1}, tags=ENABLED)
    with (
        running_stack(Scenario(scale_sets=(spec,)), store, max_surge=max_surge) as stack,
        FunctionsDriver(stack, seed=151) as run,
    ):
        run.until_settled(ticks=300)
        view = stack.sim.scale_set("rg-web", "web")
        extras = [c for c in stack.sim.history() if c.value == "overprovisioned"]
        assert extras, "armsim overprovisioned no scale-out"
        assert [r.state for r in run.records()] == [State.SUCCEEDED] * len(run.records())
        assert view.capacity == 9
        assert sorted(view.zone_counts().values()) == [3, 3, 3]


def test_extras_left_by_a_preempted_scale_out_are_not_someone_elses(store):
    """The scale-out's update ends early (preempted) while Azure's overprovisioned extras
    still stand. The capacity is still the app's, so nobody else scaled out: the move waits
    for Azure to remove them and goes on, and the set ends at its owners' capacity of 4
    (it used to end `superseded (unexpected_instances)` one VM above it)."""
    spec = ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 0, "3": 3}, tags=ENABLED)
    with (
        running_stack(Scenario(scale_sets=(spec,)), store) as stack,
        FunctionsDriver(stack, seed=152) as run,
    ):
        run.until(lambda: bool(run.records()), what="the first operation")
        assert stack.sim.actor.preempt("rg-web", "web")
        run.until_settled(ticks=300)
        view = stack.sim.scale_set("rg-web", "web")
        assert [r.outcome for r in run.records() if r.state is State.SUPERSEDED] == []
        assert view.capacity == 4
        assert sorted(view.zone_counts().values()) == [1, 1, 2]
