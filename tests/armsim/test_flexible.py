"""Flexible scale sets: VMs are Microsoft.Compute/virtualMachines listed by a $filter."""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute.models import (
    Sku,
    VirtualMachineScaleSetUpdate,
    VirtualMachineScaleSetVMInstanceRequiredIDs,
)

from armsim import ArmSim


def scale_set_filter(sim: ArmSim) -> str:
    return f"'virtualMachineScaleSet/id' eq '{sim.scale_set('rg-api', 'api').id}'"


def test_filtered_list_with_instance_view(sim: ArmSim, compute) -> None:
    vms = list(
        compute.virtual_machines.list("rg-api", filter=scale_set_filter(sim), expand="instanceView")
    )
    assert len(vms) == 4
    api = sim.scale_set("rg-api", "api")
    for vm in vms:
        assert vm.type == "Microsoft.Compute/virtualMachines"
        assert vm.virtual_machine_scale_set.id == api.id
        assert vm.name.startswith("api_") and len(vm.name) == len("api_") + 8
        assert vm.instance_view.vm_health.status.code == "HealthState/healthy"
        assert vm.provisioning_state == "Succeeded"
        assert vm.time_created is not None
    assert sorted(vm.zones[0] for vm in vms) == ["1", "2", "3", "3"]


def test_expand_needs_the_filter(compute) -> None:
    with pytest.raises(HttpResponseError) as error:
        list(compute.virtual_machines.list("rg-api", expand="instanceView"))
    assert error.value.status_code == 400
    unfiltered = list(compute.virtual_machines.list("rg-api"))
    assert len(unfiltered) == 4 and unfiltered[0].instance_view is None


def test_unsupported_filter_is_rejected(compute) -> None:
    with pytest.raises(HttpResponseError) as error:
        list(compute.virtual_machines.list("rg-api", filter="name eq 'x'"))
    assert error.value.error.code == "InvalidParameter"


def test_vmss_vm_list_of_flexible_answers_bare_items(sim: ArmSim, compute) -> None:
    """As Azure answers it (issue #15): 200 and items without properties, so neither health
    nor protection can be read there; the virtualMachines list stays the read path."""
    vms = list(compute.virtual_machine_scale_set_vms.list("rg-api", "api", expand="instanceView"))
    names = sorted(vm.name for vm in sim.scale_set("rg-api", "api").vms)
    assert sorted(vm.name for vm in vms) == names
    assert all(vm.instance_id == vm.name for vm in vms)
    assert all("properties" not in vm.as_dict() for vm in vms)


def test_flexible_vm_protection_by_name_needs_api_2023_09_01(sim: ArmSim, compute) -> None:
    name = sim.scale_set("rg-api", "api").vms[0].name
    with pytest.raises(HttpResponseError) as error:
        compute.virtual_machine_scale_set_vms.get("rg-api", "api", name, api_version="2023-07-01")
    assert error.value.status_code == 400 and "2023-09-01" in error.value.message
    vm = compute.virtual_machine_scale_set_vms.get("rg-api", "api", name, api_version="2023-09-01")
    assert vm.instance_id == name


def test_protection_is_read_and_written_through_the_vmss_vm_api(sim: ArmSim, compute) -> None:
    name = sim.scale_set("rg-api", "api").vms[0].name
    vm = compute.virtual_machine_scale_set_vms.get("rg-api", "api", name)
    assert vm.instance_id == name and vm.protection_policy is None
    vm.protection_policy = {"protectFromScaleIn": True, "protectFromScaleSetActions": False}
    compute.virtual_machine_scale_set_vms.begin_update("rg-api", "api", name, vm)
    again = compute.virtual_machine_scale_set_vms.get("rg-api", "api", name)
    assert again.protection_policy.protect_from_scale_in is True
    plain = compute.virtual_machines.get("rg-api", name)
    assert "protectionPolicy" not in plain.as_dict().get("properties", {})


def test_scale_out_creates_named_vms_and_delete_instances_takes_names(sim: ArmSim, compute) -> None:
    compute.virtual_machine_scale_sets.begin_update(
        "rg-api", "api", VirtualMachineScaleSetUpdate(sku=Sku(capacity=6))
    )
    api = sim.scale_set("rg-api", "api")
    new = [vm for vm in api.vms if vm.provisioning_state == "Creating"]
    assert sorted(vm.zone for vm in new) == ["1", "2"]
    sim.clock.advance(60)
    listed = compute.virtual_machines.list("rg-api", filter=scale_set_filter(sim))
    assert {vm.name for vm in listed} >= {vm.name for vm in new}
    poller = compute.virtual_machine_scale_sets.begin_delete_instances(
        "rg-api",
        "api",
        VirtualMachineScaleSetVMInstanceRequiredIDs(instance_ids=[new[0].name]),
    )
    sim.clock.advance(30)
    poller.result(timeout=10)
    with pytest.raises(ResourceNotFoundError):
        compute.virtual_machines.get("rg-api", new[0].name)
    assert sim.scale_set("rg-api", "api").capacity == 5


def test_deleting_a_vm_lowers_capacity(sim: ArmSim, compute) -> None:
    name = sim.scale_set("rg-api", "api").vms[-1].name
    poller = compute.virtual_machines.begin_delete("rg-api", name)
    assert compute.virtual_machines.get("rg-api", name).provisioning_state == "Deleting"
    sim.clock.advance(30)
    poller.result(timeout=10)
    assert sim.scale_set("rg-api", "api").capacity == 3
    assert compute.virtual_machine_scale_sets.get("rg-api", "api").sku.capacity == 3


def test_vm_names_depend_on_the_seed_and_writes_not_on_reads(make_sim) -> None:  # type: ignore[no-untyped-def]
    def names(reads: int) -> list[str]:
        sim = make_sim()
        compute = sim.compute_client(retry_total=0)
        for _ in range(reads):
            compute.virtual_machine_scale_sets.get("rg-api", "api")
        sim.actor.set_capacity("rg-api", "api", 6)
        return [vm.name for vm in sim.scale_set("rg-api", "api").vms]

    assert names(0) == names(3)
