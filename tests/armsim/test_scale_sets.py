"""Scale sets through azure-mgmt-compute: reads, paging, capacity changes, deletes, LROs."""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute.models import (
    Sku,
    VirtualMachineScaleSetUpdate,
    VirtualMachineScaleSetVMInstanceRequiredIDs,
)

from armsim import ArmSim, ScaleSetSpec, Scenario, Timings, ZoneCapacity

from .conftest import SimFactory


def capacity(n: int) -> VirtualMachineScaleSetUpdate:
    return VirtualMachineScaleSetUpdate(sku=Sku(capacity=n))


def ids(*values: str) -> VirtualMachineScaleSetVMInstanceRequiredIDs:
    return VirtualMachineScaleSetVMInstanceRequiredIDs(instance_ids=list(values))


def test_get_reads_every_field_the_rebalancer_needs(sim: ArmSim, compute) -> None:
    ss = compute.virtual_machine_scale_sets.get("rg-web", "web")
    assert ss.id == sim.scale_set("rg-web", "web").id
    assert ss.sku.name == "Standard_D2s_v5" and ss.sku.capacity == 13
    assert ss.zones == ["1", "2", "3"]
    assert ss.orchestration_mode == "Uniform"
    assert ss.provisioning_state == "Succeeded"
    assert ss.tags == {"zone-rebalance": "enabled"}
    assert ss.zone_balance is False
    policy = ss.resiliency_policy.automatic_zone_rebalancing_policy
    assert policy.enabled is False
    extensions = ss.virtual_machine_profile.extension_profile.extensions
    assert [e.properties.type for e in extensions] == ["ApplicationHealthLinux"]


def test_list_all_pages_with_next_link(make_sim: SimFactory) -> None:
    scale_sets = tuple(
        ScaleSetSpec(f"set{i:02d}", f"rg-{i % 3}", counts={"1": 1}) for i in range(25)
    )
    sim = make_sim(Scenario(scale_sets=scale_sets, page_size=10))
    compute = sim.compute_client(retry_total=0)
    names = [ss.name for ss in compute.virtual_machine_scale_sets.list_all()]
    assert names == [f"set{i:02d}" for i in range(25)]
    lists = [r for r in sim.requests if r.operation == "vmss.list_all"]
    assert len(lists) == 3
    assert [r.query.get("$skiptoken") for r in lists] == [None, "10", "20"]
    assert all(r.api_version == "2026-04-01" for r in lists)
    in_group = [ss.name for ss in compute.virtual_machine_scale_sets.list("rg-1")]
    assert in_group == [f"set{i:02d}" for i in range(25) if i % 3 == 1]


def test_vm_list_shows_zone_health_protection_and_model(sim: ArmSim, compute) -> None:
    vms = list(compute.virtual_machine_scale_set_vms.list("rg-web", "web", expand="instanceView"))
    assert len(vms) == 13
    by_id = {vm.instance_id: vm for vm in vms}
    assert by_id["0"].zones == ["1"] and by_id["12"].zones == ["3"]
    assert by_id["12"].protection_policy.protect_from_scale_in is True
    assert by_id["0"].protection_policy is None
    assert by_id["0"].latest_model_applied is True
    assert by_id["0"].time_created is not None
    view = by_id["0"].instance_view
    assert view.vm_health.status.code == "HealthState/healthy"
    assert [s.code for s in view.statuses] == ["ProvisioningState/succeeded", "PowerState/running"]
    plain = next(iter(compute.virtual_machine_scale_set_vms.list("rg-web", "web")))
    assert plain.instance_view is None


def test_scale_out_places_new_vms_in_the_emptiest_zones(sim: ArmSim, compute) -> None:
    poller = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(15))
    web = sim.scale_set("rg-web", "web")
    assert web.provisioning_state == "Updating"
    assert web.capacity == 15
    new = [vm for vm in web.vms if vm.provisioning_state == "Creating"]
    assert sorted(vm.zone for vm in new) == ["1", "1"]
    listed = {
        vm.instance_id: vm.provisioning_state
        for vm in compute.virtual_machine_scale_set_vms.list("rg-web", "web")
    }
    assert listed["13"] == "Creating" and listed["14"] == "Creating"
    assert poller.status() == "InProgress"

    sim.clock.advance(60)
    result = poller.result(timeout=10)
    assert result.provisioning_state == "Succeeded" and result.sku.capacity == 15
    new_vm = sim.scale_set("rg-web", "web").vm("13")
    assert (new_vm.provisioning_state, new_vm.health) == ("Succeeded", "initializing")
    sim.clock.advance(30)
    assert sim.scale_set("rg-web", "web").vm("13").health == "healthy"
    assert sim.scale_set("rg-web", "web").zone_counts() == {"1": 4, "2": 4, "3": 7}


def test_uniform_scale_out_overprovisions_by_default(make_sim: SimFactory) -> None:
    """Azure's default (`overprovision: true`): 5 more VMs create 7, shown Creating; once the
    requested 5 succeeded the 2 extras are Deleting, then gone, and their ids stay used."""
    sim = make_sim(Scenario(scale_sets=(ScaleSetSpec("web", "rg-web", counts={"1": 3}),)))
    compute = sim.compute_client()
    assert compute.virtual_machine_scale_sets.get("rg-web", "web").overprovision is True
    poller = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(8))
    web = sim.scale_set("rg-web", "web")
    creating = [vm for vm in web.vms if vm.provisioning_state == "Creating"]
    assert sorted(int(vm.instance_id) for vm in creating) == list(range(3, 10))
    assert sorted(vm.zone for vm in creating) == ["1", "2", "2", "2", "3", "3", "3"]
    sim.clock.advance(60)
    assert poller.result(timeout=10).sku.capacity == 8
    listed = {
        vm.instance_id: vm.provisioning_state
        for vm in compute.virtual_machine_scale_set_vms.list("rg-web", "web")
    }
    assert sorted(listed.values()).count("Deleting") == 2
    sim.clock.advance(30)
    web = sim.scale_set("rg-web", "web")
    assert len(web.vms) == 8 and web.capacity == 8
    assert web.zone_counts() == {"1": 3, "2": 3, "3": 2}
    ids = {int(vm.instance_id) for vm in web.vms}
    assert len(ids) == 8 and ids != set(range(8))
    extras = [c for c in sim.history() if c.value == "overprovisioned"]
    assert [(c.change, c.principal_id) for c in extras] == [("deleting", None)] * 2


def test_overprovisioning_can_be_switched_off(make_sim: SimFactory) -> None:
    spec = ScaleSetSpec("web", "rg-web", counts={"1": 3}, overprovision=False)
    sim = make_sim(Scenario(scale_sets=(spec,)))
    compute = sim.compute_client()
    assert compute.virtual_machine_scale_sets.get("rg-web", "web").overprovision is False
    compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(8))
    sim.clock.advance(90)
    web = sim.scale_set("rg-web", "web")
    assert sorted(int(vm.instance_id) for vm in web.vms) == list(range(8))
    assert not [c for c in sim.history() if c.value == "overprovisioned"]


def test_zone_without_room_sends_vms_elsewhere_then_fails_allocation(make_sim: SimFactory) -> None:
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec("web", "rg-web", counts={"1": 2, "2": 4, "3": 7}, overprovision=False),
        ),
        capacity=(
            ZoneCapacity("westeurope", "Standard_D2s_v5", "1", 0),
            ZoneCapacity("westeurope", "Standard_D2s_v5", "2", 1),
            ZoneCapacity("westeurope", "Standard_D2s_v5", "3", 0),
        ),
    )
    sim = make_sim(scenario)
    compute = sim.compute_client(retry_total=0)
    poller = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(15))
    web = sim.scale_set("rg-web", "web")
    creating = [vm for vm in web.vms if vm.provisioning_state == "Creating"]
    assert sorted(vm.zone for vm in creating) == ["1", "2"]
    sim.clock.advance(60)
    with pytest.raises(HttpResponseError) as failure:
        poller.result(timeout=10)
    assert "ZonalAllocationFailed" in str(failure.value)
    web = sim.scale_set("rg-web", "web")
    assert web.zone_counts() == {"1": 2, "2": 5, "3": 7}
    failed = [vm for vm in web.vms if vm.provisioning_state == "Failed"]
    assert [vm.failure_code for vm in failed] == ["ZonalAllocationFailed"]
    assert web.provisioning_state == "Succeeded"
    vm = compute.virtual_machine_scale_set_vms.get(
        "rg-web", "web", failed[0].instance_id, expand="instanceView"
    )
    assert vm.instance_view.statuses[0].code == "ProvisioningState/failed/ZonalAllocationFailed"
    assert sim.zone_room("westeurope", "Standard_D2s_v5", "2") == 0


def test_failed_scale_out_names_each_failed_vm_in_its_error(make_sim: SimFactory) -> None:
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec(
                "web",
                "rg-web",
                zones=("1", "2"),
                counts={"1": 1, "2": 2},
                zone_balance=True,
                overprovision=False,  # one new VM, so exactly one failed VM to name
            ),
        ),
        capacity=(ZoneCapacity("westeurope", "Standard_D2s_v5", "1", 0),),
        failure_codes_in_lists=(),
    )
    sim = make_sim(scenario)
    compute = sim.compute_client(retry_total=0)
    poller = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(4))
    sim.clock.advance(60)
    with pytest.raises(HttpResponseError) as failure:
        poller.result(timeout=10)
    (failed,) = [
        vm for vm in sim.scale_set("rg-web", "web").vms if vm.provisioning_state == "Failed"
    ]
    error = failure.value.error
    assert error.code == "ZonalAllocationFailed"
    assert [(d.code, d.target) for d in error.details] == [
        ("ZonalAllocationFailed", failed.instance_id)
    ]
    # The list leaves the sub-code out (failure_codes_in_lists); the VM's own view has it.
    (listed,) = [
        vm
        for vm in compute.virtual_machine_scale_set_vms.list("rg-web", "web", expand="instanceView")
        if vm.instance_id == failed.instance_id
    ]
    assert [s.code for s in listed.instance_view.statuses] == ["ProvisioningState/failed"]
    vm = compute.virtual_machine_scale_set_vms.get(
        "rg-web", "web", failed.instance_id, expand="instanceView"
    )
    assert vm.instance_view.statuses[0].code == "ProvisioningState/failed/ZonalAllocationFailed"


def test_delete_instances_waits_for_terminate_notification(make_sim: SimFactory) -> None:
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec(
                "web",
                "rg-web",
                counts={"1": 1, "2": 1},
                zones=("1", "2"),
                terminate_notification_seconds=300,
            ),
        ),
        timings=Timings(delete=30),
    )
    sim = make_sim(scenario)
    compute = sim.compute_client(retry_total=0)
    poller = compute.virtual_machine_scale_sets.begin_delete_instances("rg-web", "web", ids("1"))
    web = sim.scale_set("rg-web", "web")
    assert web.capacity == 1
    assert web.vm("1").provisioning_state == "Deleting"
    assert web.zone_counts() == {"1": 1, "2": 0}
    sim.clock.advance(320)
    assert sim.scale_set("rg-web", "web").vm("1").provisioning_state == "Deleting"
    assert poller.status() == "InProgress"
    sim.clock.advance(10)
    assert poller.result(timeout=10) is None
    assert [vm.instance_id for vm in sim.scale_set("rg-web", "web").vms] == ["0"]
    with pytest.raises(ResourceNotFoundError):
        compute.virtual_machine_scale_set_vms.get("rg-web", "web", "1")


def test_delete_instances_of_unknown_id_is_rejected(compute) -> None:
    with pytest.raises(HttpResponseError) as error:
        compute.virtual_machine_scale_sets.begin_delete_instances("rg-web", "web", ids("99"))
    assert error.value.status_code == 400
    assert error.value.error.code == "InvalidParameter"


def test_protected_vm_can_still_be_deleted_by_id(sim: ArmSim, compute) -> None:
    """Instance protection does not stop an explicit delete (the rebalancer must check)."""
    compute.virtual_machine_scale_sets.begin_delete_instances("rg-web", "web", ids("12"))
    assert sim.scale_set("rg-web", "web").vm("12").provisioning_state == "Deleting"


def test_scale_in_skips_protected_vms_and_balances_zones(sim: ArmSim, compute) -> None:
    compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(10))
    deleting = [
        vm for vm in sim.scale_set("rg-web", "web").vms if vm.provisioning_state == "Deleting"
    ]
    assert sorted(vm.instance_id for vm in deleting) == ["10", "11", "9"]
    sim.clock.advance(31)
    assert sim.scale_set("rg-web", "web").zone_counts() == {"1": 2, "2": 4, "3": 4}


def test_newer_capacity_change_preempts_the_running_one(sim: ArmSim, compute) -> None:
    first = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(15))
    second = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(16))
    with pytest.raises(HttpResponseError) as canceled:
        first.result(timeout=10)
    assert "OperationPreempted" in str(canceled.value)
    sim.clock.advance(60)
    assert second.result(timeout=10).sku.capacity == 16
    assert len(sim.scale_set("rg-web", "web").vms) == 16


def test_get_missing_scale_set_and_group_are_404(compute) -> None:
    with pytest.raises(ResourceNotFoundError) as missing:
        compute.virtual_machine_scale_sets.get("rg-web", "nope")
    assert missing.value.error.code == "ResourceNotFound"
    with pytest.raises(ResourceNotFoundError) as group:
        compute.virtual_machine_scale_sets.get("rg-nope", "web")
    assert group.value.error.code == "ResourceGroupNotFound"


def test_scale_set_instance_view_summarises_vms(compute) -> None:
    view = compute.virtual_machine_scale_sets.get_instance_view("rg-web", "web")
    summary = {s.code: s.count for s in view.virtual_machine.statuses_summary}
    assert summary == {"ProvisioningState/succeeded": 13}


def test_delete_scale_set_removes_it_after_its_vms(sim: ArmSim, compute) -> None:
    poller = compute.virtual_machine_scale_sets.begin_delete("rg-web", "web")
    assert sim.scale_set("rg-web", "web").provisioning_state == "Deleting"
    sim.clock.advance(31)
    poller.result(timeout=10)
    with pytest.raises(ResourceNotFoundError):
        compute.virtual_machine_scale_sets.get("rg-web", "web")
    assert [ss.name for ss in compute.virtual_machine_scale_sets.list_all()] == ["api"]


def test_poll_advance_lets_a_blocking_client_finish(make_sim: SimFactory) -> None:
    from .conftest import web_scenario

    sim = make_sim(web_scenario(timings=Timings(poll_advance=20)))
    compute = sim.compute_client(retry_total=0)
    poller = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(14))
    assert poller.result(timeout=10).provisioning_state == "Succeeded"
    assert sim.clock.now() > sim.scenario.start
