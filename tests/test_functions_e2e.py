"""The operations scenarios end to end, driven only through the Azure Functions entry points.

armsim's Event Grid events reach the real decorated Event Grid function (decoded by the
azure.functions converter from the exact payload armsim emits), delivered at least once,
sometimes twice and out of order; timer ticks reach the real timer function; Azurite holds
the state. After every tick the never-rules are checked, and every write the app sent to
armsim must be one operation step's, sent once (tests/functions_driver.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from armsim import ScaleSetSpec, Scenario, VmOverride
from rebalancer import service
from rebalancer.operation import State
from tests.functions_driver import FunctionsDriver
from tests.stack import running_stack

ENABLED = {"zone-rebalance": "enabled"}
MODES = ["Uniform", "Flexible"]


@pytest.fixture(autouse=True)
def _reset_runtime() -> Iterator[None]:
    service.use_runtime(None)
    yield
    service.use_runtime(None)


def web(mode: str, counts: dict[str, int], **options) -> Scenario:
    extra = {k: options.pop(k) for k in ("capacity", "quotas") if k in options}
    spec = ScaleSetSpec("web", "rg-web", mode=mode, counts=counts, tags=ENABLED, **options)
    return Scenario(scale_sets=(spec,), **extra)


def ids(view) -> set[str]:
    return {vm.instance_id for vm in view.vms}


@pytest.mark.parametrize("mode", MODES)
def test_1_3_3_is_balanced_by_one_move(store, mode):
    with (
        running_stack(web(mode, {"1": 1, "2": 3, "3": 3}), store) as stack,
        FunctionsDriver(stack, seed=1) as run,
    ):
        before = ids(stack.sim.scale_set("rg-web", "web"))
        run.until_settled()
        after = stack.sim.scale_set("rg-web", "web")
        assert sorted(after.zone_counts().values()) == [2, 2, 3]
        assert after.capacity == 7 and len(before - ids(after)) == 1
        (record,) = run.records()
        assert record.state is State.SUCCEEDED and record.k == 1
        assert len(run.app_writes()) == 2  # one scale-out, one delete
        assert run.duplicates_delivered() > 0


@pytest.mark.parametrize("mode", MODES)
def test_0_2_4_with_max_surge_2_moves_two_vms_in_one_operation(store, mode):
    scenario = web(mode, {"1": 0, "2": 2, "3": 4})
    with (
        running_stack(scenario, store, max_surge="2") as stack,
        FunctionsDriver(stack, seed=2) as run,
    ):
        run.until_settled()
        after = stack.sim.scale_set("rg-web", "web")
        assert after.zone_counts() == {"1": 2, "2": 2, "3": 2} and after.capacity == 6
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        assert (record.k, record.target_capacity, len(record.kept)) == (2, 8, 2)
        assert sorted(c.zone for c in run.app_deletes()) == ["3", "3"]
        assert [w.operation for w in run.app_writes()] == ["vmss.update", "vmss.delete_instances"]


@pytest.mark.parametrize("mode", MODES)
def test_2_4_7_with_deallocated_vms_ends_at_4_4_5(store, mode):
    deallocated = (VmOverride(zone="3", count=2, power_state="deallocated"),)
    scenario = web(mode, {"1": 2, "2": 4, "3": 7}, overrides=deallocated)
    with running_stack(scenario, store) as stack, FunctionsDriver(stack, seed=3, step=60) as run:
        run.until_settled()
        after = stack.sim.scale_set("rg-web", "web")
        assert after.zone_counts() == {"1": 4, "2": 4, "3": 5} and after.capacity == 13
        assert run.states() == [State.SUCCEEDED, State.SUCCEEDED]
        assert sum(1 for vm in after.vms if vm.power_state == "deallocated") == 2
        assert all(c.health == "healthy" for c in run.app_deletes())  # active sources only
