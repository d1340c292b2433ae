"""Spot (evictions, priority mix, the low-priority quota), instance mix and standby pools.

Through the real azure-mgmt-compute client; the sources of each behaviour are in
docs/armsim.md ("Spot, instance mix and standby pools").
"""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError
from azure.mgmt.compute.models import Sku, VirtualMachineScaleSetUpdate

from armsim import EvictionSpec, QuotaSpec, ScaleSetSpec, Scenario, ScenarioError


def spot_set(**kwargs: object) -> ScaleSetSpec:
    values: dict[str, object] = {
        "name": "batch",
        "resource_group": "rg-batch",
        "mode": "Flexible",
        "priority": "Spot",
        "counts": {"1": 2, "2": 2, "3": 2},
    }
    values.update(kwargs)
    return ScaleSetSpec(**values)  # type: ignore[arg-type]


def vms(compute, sim) -> list:
    flt = f"'virtualMachineScaleSet/id' eq '{sim.scale_set('rg-batch', 'batch').id}'"
    return list(compute.virtual_machines.list("rg-batch", filter=flt, expand="instanceView"))


def test_a_spot_set_shows_its_priority_and_eviction_policy(make_sim) -> None:
    sim = make_sim(Scenario(scale_sets=(spot_set(eviction_policy="Delete"),)))
    compute = sim.compute_client(retry_total=0)
    model = compute.virtual_machine_scale_sets.get("rg-batch", "batch")
    assert model.virtual_machine_profile.priority == "Spot"
    assert model.virtual_machine_profile.eviction_policy == "Delete"
    assert {vm.priority for vm in vms(compute, sim)} == {"Spot"}


def test_spot_vcpus_count_in_the_low_priority_quota_only(make_sim) -> None:
    sim = make_sim(Scenario(scale_sets=(spot_set(),)))
    compute = sim.compute_client(retry_total=0)
    usages = {u.name.value: u for u in compute.usage.list("westeurope")}
    low = usages["lowPriorityCores"]
    assert low.name.localized_value == "Total Regional Low-priority vCPUs"
    assert (low.current_value, usages["cores"].current_value) == (12, 0)
    assert usages["standardDSv5Family"].current_value == 0


def test_a_spot_scale_out_over_the_low_priority_quota_is_refused(make_sim) -> None:
    quota = QuotaSpec("westeurope", "lowPriorityCores", 14)
    sim = make_sim(Scenario(scale_sets=(spot_set(),), quotas=(quota,)))
    compute = sim.compute_client(retry_total=0)
    update = VirtualMachineScaleSetUpdate(sku=Sku(capacity=8))
    with pytest.raises(HttpResponseError) as error:
        compute.virtual_machine_scale_sets.begin_update("rg-batch", "batch", update)
    assert error.value.error.code == "OperationNotAllowed"
    assert "Low Priority Cores quota" in error.value.error.message


@pytest.mark.parametrize(("policy", "left"), [("Deallocate", 6), ("Delete", 5)])
def test_evictions_follow_the_eviction_policy_on_the_clock(make_sim, policy, left) -> None:
    eviction = EvictionSpec("rg-batch", "batch", after_seconds=600, zone="2")
    sim = make_sim(Scenario(scale_sets=(spot_set(eviction_policy=policy),), evictions=(eviction,)))
    sim.advance(599)
    assert all(vm.power_state == "running" for vm in sim.scale_set("rg-batch", "batch").vms)
    sim.advance(60)
    batch = sim.scale_set("rg-batch", "batch")
    assert (len(batch.vms), batch.capacity) == (left, left)
    if policy == "Deallocate":
        (evicted,) = [vm for vm in batch.vms if vm.power_state == "deallocated"]
        assert evicted.zone == "2" and evicted.counts
    assert sim.events == []  # evictions are silent


def test_a_priority_mix_keeps_its_split_as_it_scales_out(make_sim) -> None:
    spec = spot_set(
        counts={"1": 2, "2": 1, "3": 1},
        base_regular_priority_count=2,
        regular_priority_percentage_above_base=50,
    )
    sim = make_sim(Scenario(scale_sets=(spec,)))
    compute = sim.compute_client(retry_total=0)
    model = compute.virtual_machine_scale_sets.get("rg-batch", "batch")
    assert model.priority_mix_policy.base_regular_priority_count == 2
    assert sorted(vm.priority for vm in vms(compute, sim)) == ["Regular"] * 3 + ["Spot"]
    update = VirtualMachineScaleSetUpdate(sku=Sku(capacity=6))
    compute.virtual_machine_scale_sets.begin_update("rg-batch", "batch", update)
    sim.advance(90)
    spot = [vm.spot for vm in sim.scale_set("rg-batch", "batch").vms]
    assert (spot.count(False), spot.count(True)) == (4, 2)


def test_instance_mix_and_standby_pool_shapes(make_sim) -> None:
    spec = spot_set(
        priority="Regular", vm_sizes=("Standard_D2s_v5", "Standard_D2as_v5"), standby={"3": 2}
    )
    sim = make_sim(Scenario(scale_sets=(spec,)))
    compute = sim.compute_client(retry_total=0)
    model = compute.virtual_machine_scale_sets.get("rg-batch", "batch")
    assert model.sku.name == "Mix"
    assert [size.name for size in model.sku_profile.vm_sizes] == list(spec.vm_sizes)
    listed = vms(compute, sim)
    pooled = [vm for vm in listed if vm.instance_view.is_vm_in_standby_pool]
    assert len(listed) == 8 and len(pooled) == 2
    assert sim.scale_set("rg-batch", "batch").zone_counts() == {"1": 2, "2": 2, "3": 2}
    update = VirtualMachineScaleSetUpdate(sku=Sku(capacity=7))
    compute.virtual_machine_scale_sets.begin_update("rg-batch", "batch", update)
    sim.advance(90)
    batch = sim.scale_set("rg-batch", "batch")
    assert len(batch.vms) == 8  # the scale-out took a pool VM instead of creating one
    assert batch.zone_counts() == {"1": 2, "2": 2, "3": 3}


def test_a_priority_mix_needs_a_flexible_spot_set() -> None:
    with pytest.raises(ScenarioError, match="needs mode"):
        Scenario(scale_sets=(spot_set(mode="Uniform", base_regular_priority_count=1),))
    with pytest.raises(ScenarioError, match='needs priority = "Spot"'):
        Scenario(scale_sets=(spot_set(priority="Regular", base_regular_priority_count=1),))
