"""Adversarial checks of the delete path (docs/safety-review.md), against armsim and Azurite
through the real SDK clients, or pure tests of `rebalancer.operation`. Each test is a way the
app could delete the wrong VM, leave one behind, or act twice; each passes only when it can't.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from armsim import ScaleSetSpec, Scenario, VmOverride
from rebalancer.compute.errors import AdapterError
from rebalancer.evaluator import assess
from rebalancer.model import ScaleSetRef
from rebalancer.operation import State
from tests.stack import Drive, running_stack

ENABLED = {"zone-rebalance": "enabled"}
NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def two_zones(mode: str, counts: dict[str, int]) -> Scenario:
    spec = ScaleSetSpec("web", "rg-web", mode=mode, zones=("1", "2"), counts=counts, tags=ENABLED)
    return Scenario(scale_sets=(spec,))


def test_a_protected_flexible_vm_is_never_chosen_as_source_after_the_scale_out(store):
    """Flexible lists carry no protection; it is read only for planned sources. After the
    scale-out the set is balanced (1/3 + 1 new = 2/3), so no source is planned any more and
    the delete must still not pick the protected VM that the first plan avoided."""
    with running_stack(two_zones("Flexible", {"1": 1, "2": 3}), store) as stack:
        zone_2 = sorted(
            vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms if vm.zone == "2"
        )
        best = zone_2[-1]  # the platform's scale-in order: highest id first
        stack.sim.actor.protect("rg-web", "web", best)
        run = Drive(stack)
        run.until_terminal()
        present = {vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms}
        assert best in present
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        assert best not in record.sources


def test_flexible_protection_applies_to_vm_names_with_capital_letters(store):
    """Flexible VM names are `<scale set name>_<suffix>`, so `WebFront_...` is common; the
    protection read for a planned source must mark that very VM."""
    spec = ScaleSetSpec(
        "WebFront",
        "rg-web",
        mode="Flexible",
        zones=("1", "2"),
        counts={"1": 1, "2": 3},
        tags=ENABLED,
        overrides=(VmOverride(zone="2", count=3, protect_from_scale_in=True),),
    )
    with running_stack(Scenario(scale_sets=(spec,)), store) as stack:
        view = stack.sim.scale_set("rg-web", "WebFront")
        inventory = stack.compute.read_inventory(ScaleSetRef.parse(view.id), NOW)
        zone_2 = [i for i in inventory.instances if i.zone == "2"]
        assert len(zone_2) == 3 and all(i.protected for i in zone_2)
        assert assess(inventory).moves == ()
        run = Drive(stack, names=(("rg-web", "WebFront"),))
        for _ in range(6):
            run.tick()
        assert run.records("WebFront") == []
        assert run.app_deletes() == []


@pytest.mark.parametrize("mode", ["Uniform", "Flexible"])
def test_delete_instances_reads_protection_again_right_before_deleting(store, mode):
    """The observation a delete was decided on may be minutes old: a VM protected since then
    is left out, and when every id is protected nothing is deleted at all."""
    with running_stack(two_zones(mode, {"1": 2, "2": 3}), store) as stack:
        view = stack.sim.scale_set("rg-web", "web")
        ref = ScaleSetRef.parse(view.id)
        first, second = sorted(vm.instance_id for vm in view.vms if vm.zone == "2")[:2]
        stack.sim.actor.protect("rg-web", "web", first, scale_in=False, scale_set_actions=True)
        call = stack.compute.delete_instances(ref, (first, second))
        assert call.instance_ids == (second,)
        with pytest.raises(AdapterError) as refused:
            stack.compute.delete_instances(ref, (first,))
        assert refused.value.code == "InstanceProtected" and first in refused.value.message
        stack.sim.advance(600)
        present = {vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms}
        assert first in present and second not in present
