"""A new VM that lands in a zone tied with the planned one balances the scale set as well."""

from __future__ import annotations

import pytest

from armsim import ScaleSetSpec, Scenario, VmOverride, ZoneCapacity
from devkit.stack import Stack, running_stack
from rebalancer.model import ScaleSetRef


def run_one_operation(stack: Stack, ref: ScaleSetRef) -> str:
    """Reconcile and let virtual time pass until one operation has ended; its final state."""
    reconciler = stack.reconciler()
    for _ in range(60):
        reconciler.reconcile(ref)
        stack.sim.advance(30)
        if stack.store.history(ref.key) and not stack.store.active_operations():
            break
    (finished,) = stack.store.history(ref.key)
    return finished.state


@pytest.mark.parametrize("mode", ["Uniform", "Flexible"])
def test_a_vm_placed_in_the_other_emptiest_zone_is_kept(store_factory, mode):
    store = store_factory()
    # Zones 1 and 2 both hold the fewest VMs; the plan names zone 1, which has no room, so
    # Azure's best-effort placement puts the new VM in zone 2.
    scenario = Scenario(
        capacity=(ZoneCapacity("westeurope", "Standard_D2s_v5", "1", 0),),
        scale_sets=(
            ScaleSetSpec(
                "web",
                "rg-web",
                mode=mode,
                counts={"1": 1, "2": 1, "3": 3},
                tags={"zone-rebalance": "enabled"},
            ),
        ),
    )
    with running_stack(scenario, store) as stack:
        ref = ScaleSetRef.parse(stack.sim.scale_set("rg-web", "web").id)
        assert run_one_operation(stack, ref) == "succeeded"
        assert stack.counts("rg-web", "web") == {"1": 1, "2": 2, "3": 2}
        assert store.backoffs(stack.sim.clock.now()) == []


def test_the_other_emptiest_zone_is_kept_when_the_planned_one_is_short(store_factory):
    """Zones 1 and 2 hold one VM each; zone 2's is deallocated, so the plan names zone 2
    (fewer active VMs), but zone 2 has no room: the VM Azure puts in zone 1 balances the
    totals and still improves the active spread, so it is kept (chaos 0214-storage)."""
    store = store_factory()
    scenario = Scenario(
        capacity=(ZoneCapacity("westeurope", "Standard_D2s_v5", "2", 0),),
        scale_sets=(
            ScaleSetSpec(
                "web",
                "rg-web",
                counts={"1": 1, "2": 1, "3": 3},
                tags={"zone-rebalance": "enabled"},
                overrides=(VmOverride(zone="2", power_state="deallocated"),),
            ),
        ),
    )
    with running_stack(scenario, store) as stack:
        ref = ScaleSetRef.parse(stack.sim.scale_set("rg-web", "web").id)
        assert run_one_operation(stack, ref) == "succeeded"
        assert stack.counts("rg-web", "web") == {"1": 2, "2": 1, "3": 2}
