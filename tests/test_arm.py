"""ARM JSON (REST and az shapes) -> model values, on the REST spec's example bodies and on
hand-made documents for each field."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rebalancer.arm import (
    ArmParseError,
    instance_belongs_to,
    parse_duration,
    parse_instance,
    parse_instances,
    parse_rolling_upgrade,
    parse_scale_set,
    parse_time,
)
from rebalancer.model import (
    Health,
    HealthMonitoring,
    OrchestrationMode,
    PowerState,
    ScaleSetRef,
)

SPEC_EXAMPLES = Path(__file__).parent / "data" / "arm-examples"
SUB = "00000000-0000-0000-0000-000000000000"
VMSS_ID = (
    f"/subscriptions/{SUB}/resourceGroups/rg-web"
    "/providers/Microsoft.Compute/virtualMachineScaleSets/web"
)
REF = ScaleSetRef.parse(VMSS_ID)


def spec_body(name: str, status: str = "200") -> Any:
    document = json.loads((SPEC_EXAMPLES / name).read_text())
    return document["responses"][status]["body"]


def flatten(doc: dict[str, Any]) -> dict[str, Any]:
    """The az CLI shape of a REST object: `properties` merged into the object."""
    flat = {key: value for key, value in doc.items() if key != "properties"}
    flat.update(doc.get("properties", {}))
    return flat


def rest_scale_set(**properties: Any) -> dict[str, Any]:
    return {
        "id": VMSS_ID,
        "name": "web",
        "type": "Microsoft.Compute/virtualMachineScaleSets",
        "location": "westeurope",
        "tags": {"zone-rebalance": "enabled"},
        "sku": {"name": "Standard_D2s_v5", "tier": "Standard", "capacity": 6},
        "zones": ["1", "2", "3"],
        "properties": {
            "orchestrationMode": "Uniform",
            "provisioningState": "Succeeded",
            "zoneBalance": False,
            "virtualMachineProfile": {
                "extensionProfile": {
                    "extensions": [
                        {
                            "name": "HealthExtension",
                            "properties": {
                                "publisher": "Microsoft.ManagedServices",
                                "type": "ApplicationHealthLinux",
                                "typeHandlerVersion": "2.0",
                            },
                        }
                    ]
                },
            },
            **properties,
        },
    }


def rest_vm(instance_id: str = "4", zone: str = "2", **properties: Any) -> dict[str, Any]:
    return {
        "id": f"{VMSS_ID}/virtualMachines/{instance_id}",
        "name": f"web_{instance_id}",
        "instanceId": instance_id,
        "zones": [zone],
        "properties": {
            "latestModelApplied": True,
            "provisioningState": "Succeeded",
            "timeCreated": "2026-01-04T08:00:00.1234567+00:00",
            "instanceView": {
                "statuses": [
                    {"code": "ProvisioningState/succeeded", "level": "Info"},
                    {"code": "PowerState/running", "level": "Info"},
                ],
                "vmHealth": {"status": {"code": "HealthState/healthy", "level": "Info"}},
            },
            **properties,
        },
    }


# --- the REST specification's example bodies --------------------------------------------


def test_spec_scale_set_get_parses_as_a_non_zonal_uniform_set() -> None:
    scale = parse_scale_set(spec_body("VirtualMachineScaleSet_Get_WithDiskControllerType.json"))
    assert scale.ref.name == "myVirtualMachineScaleSet"
    assert scale.ref.resource_group == "myResourceGroup"
    assert scale.zones == ()
    assert scale.sku_name == "Standard_D2s_v3"
    assert scale.capacity == 4
    assert scale.mode is OrchestrationMode.UNIFORM
    assert scale.provisioning_state == "Succeeded"  # the example spells it "succeeded"
    assert scale.health_monitoring is HealthMonitoring.NONE
    assert scale.platform_rebalancing is False
    assert scale.tag("MYTAG1") == "tagValue1"


def test_spec_scale_set_with_platform_rebalancing_policy() -> None:
    body = spec_body("VirtualMachineScaleSet_Create_WithAutomaticZoneRebalancingPolicy.json")
    scale = parse_scale_set(body)
    assert scale.platform_rebalancing is True
    assert scale.provisioning_state == "Creating"


def test_spec_scale_set_update_response_reads_every_field() -> None:
    scale = parse_scale_set(spec_body("VirtualMachineScaleSet_Update_MaximumSet_Gen.json"))
    assert scale.zones == ("aaaaaaaaaaaaaaaaaaaa",)
    assert scale.zone_balance is True
    assert scale.terminate_notification == timedelta(minutes=10)
    assert scale.health_monitoring is HealthMonitoring.LOAD_BALANCER_PROBE
    assert scale.tags == {"key8425": "aaa"}


def test_spec_uniform_vm_list_parses() -> None:
    body = spec_body("VirtualMachineScaleSetVM_List_MaximumSet_Gen.json")
    (instance,) = parse_instances(body, OrchestrationMode.UNIFORM)
    assert instance.id == "aaaaaaaaaaaa"
    assert instance.zone == "a"
    assert instance.protected
    assert instance.provisioning_state == "Succeeded"
    assert instance.power_state is PowerState.UNKNOWN  # the example's status codes are "aaa..."
    assert instance.health is Health.UNKNOWN
    assert instance.created == datetime(2021, 6, 27, 1, 2, 38, 313846, tzinfo=UTC)


def test_spec_flexible_vm_list_parses_with_and_without_instance_view() -> None:
    body = spec_body("VirtualMachine_List_MaximumSet_Gen.json")
    bare, expanded = parse_instances(body, OrchestrationMode.FLEXIBLE)
    assert bare.id == bare.name == "{virtualMachineName}"
    assert bare.power_state is PowerState.UNKNOWN
    assert bare.health is Health.NOT_REPORTED
    assert bare.provisioning_state == "Succeeded"
    assert expanded.zone == "aaaaaa"
    assert expanded.created == datetime(2022, 1, 14, 16, 43, 41, 685000, tzinfo=UTC)
    # the example's virtualMachineScaleSet.id is not a scale set id: it belongs to none
    assert not instance_belongs_to(body["value"][0], REF)


@pytest.mark.parametrize(
    "name",
    [
        "VirtualMachineScaleSetVM_Get_WithVMSizeProperties.json",
        "VirtualMachineScaleSetVM_Get_WithResilientVMDeletionStatus.json",
    ],
)
def test_spec_single_uniform_vms_parse(name: str) -> None:
    instance = parse_instance(spec_body(name), OrchestrationMode.UNIFORM)
    assert instance.id
    assert instance.latest_model in (True, False)


def test_spec_instance_views_give_provisioning_and_power_state() -> None:
    for name in (
        "VirtualMachine_Get_InstanceView.json",
        "VirtualMachineScaleSetVM_Get_InstanceViewAutoPlacedOnDedicatedHostGroup.json",
    ):
        view = spec_body(name)
        doc = {"name": "vm-1", "zones": ["1"], "properties": {"instanceView": view}}
        instance = parse_instance(doc, OrchestrationMode.FLEXIBLE)
        assert instance.provisioning_state == "Succeeded"
        assert instance.power_state is PowerState.RUNNING
        assert instance.active
        assert instance.health is Health.NOT_REPORTED


def test_spec_scale_set_list_is_not_one_scale_set() -> None:
    with pytest.raises(ArmParseError, match="list response"):
        parse_scale_set(spec_body("VirtualMachineScaleSet_List_MinimumSet_Gen.json"))


# --- scale sets -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [lambda d: d, flatten], ids=["rest", "az"])
def test_scale_set_fields_in_both_shapes(shape) -> None:
    doc = rest_scale_set(
        resiliencyPolicy={"automaticZoneRebalancingPolicy": {"enabled": False}},
    )
    doc["properties"]["virtualMachineProfile"]["scheduledEventsProfile"] = {
        "terminateNotificationProfile": {"enable": True, "notBeforeTimeout": "PT7M"}
    }
    scale = parse_scale_set(shape(doc))
    assert scale.ref == REF
    assert scale.location == "westeurope"
    assert scale.zones == ("1", "2", "3")
    assert scale.sku_name == "Standard_D2s_v5"
    assert scale.capacity == 6
    assert scale.mode is OrchestrationMode.UNIFORM
    assert scale.provisioning_state == "Succeeded"
    assert scale.health_monitoring is HealthMonitoring.EXTENSION
    assert scale.platform_rebalancing is False
    assert scale.tag("Zone-Rebalance") == "enabled"
    assert scale.terminate_notification == timedelta(minutes=7)


def test_az_flattened_extension_type_is_recognised() -> None:
    doc = flatten(rest_scale_set())
    doc["virtualMachineProfile"]["extensionProfile"]["extensions"] = [
        {
            "name": "HealthExtension",
            "type": "Microsoft.Compute/virtualMachineScaleSets/extensions",
            "typePropertiesType": "ApplicationHealthWindows",
        }
    ]
    assert parse_scale_set(doc).health_monitoring is HealthMonitoring.EXTENSION


def test_flexible_pascal_case_policy_and_probe() -> None:
    doc = rest_scale_set(
        orchestrationMode="flexible",
        resiliencyPolicy={"AutomaticZoneRebalancingPolicy": {"Enabled": True}},
    )
    profile = doc["properties"]["virtualMachineProfile"]
    profile["extensionProfile"]["extensions"] = []
    profile["networkProfile"] = {"healthProbe": {"id": f"{VMSS_ID}/probe"}}
    scale = parse_scale_set(doc)
    assert scale.mode is OrchestrationMode.FLEXIBLE
    assert scale.platform_rebalancing is True
    assert scale.health_monitoring is HealthMonitoring.LOAD_BALANCER_PROBE


def test_minimal_scale_set_gets_documented_defaults() -> None:
    scale = parse_scale_set({"id": VMSS_ID})
    assert scale.zones == ()
    assert scale.sku_name is None
    assert scale.capacity is None
    assert scale.mode is OrchestrationMode.UNIFORM
    assert scale.provisioning_state == "Unknown"
    assert scale.health_monitoring is HealthMonitoring.NONE
    assert scale.tags == {}
    assert scale.terminate_notification is None


def test_disabled_terminate_notification_is_none() -> None:
    doc = rest_scale_set()
    doc["properties"]["virtualMachineProfile"]["scheduledEventsProfile"] = {
        "terminateNotificationProfile": {"enable": False, "notBeforeTimeout": "PT7M"}
    }
    assert parse_scale_set(doc).terminate_notification is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "expected a scale set object"),
        ({"value": []}, "list response"),
        ({"name": "web"}, "no 'id'"),
        ({"id": "/subscriptions/x/resourceGroups/y"}, "not a scale set resource id"),
        ({"id": f"{VMSS_ID}/virtualMachines/0"}, "below a scale set"),
        (
            {"id": VMSS_ID, "type": "Microsoft.Compute/virtualMachines"},
            "expected type Microsoft.Compute/virtualMachineScaleSets",
        ),
        ({"id": VMSS_ID, "properties": {"orchestrationMode": "Hybrid"}}, "orchestrationMode"),
    ],
)
def test_documents_that_are_not_a_scale_set_are_rejected(doc, message) -> None:
    with pytest.raises(ArmParseError, match=message):
        parse_scale_set(doc)


# --- instances --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [lambda d: d, flatten], ids=["rest", "az"])
def test_uniform_vm_fields_in_both_shapes(shape) -> None:
    doc = rest_vm(
        "12",
        "3",
        protectionPolicy={"protectFromScaleIn": False, "protectFromScaleSetActions": True},
        latestModelApplied=False,
    )
    instance = parse_instance(shape(doc), OrchestrationMode.UNIFORM)
    assert instance.id == "12"
    assert instance.name == "web_12"
    assert instance.zone == "3"
    assert instance.provisioning_state == "Succeeded"
    assert instance.power_state is PowerState.RUNNING
    assert instance.health is Health.HEALTHY
    assert instance.protect_from_scale_set_actions and not instance.protect_from_scale_in
    assert instance.latest_model is False
    assert instance.created == datetime(2026, 1, 4, 8, 0, 0, 123456, tzinfo=UTC)
    assert instance.healthy


def test_flexible_vm_id_is_its_name() -> None:
    doc = rest_vm(virtualMachineScaleSet={"id": VMSS_ID})
    doc["id"] = (
        f"/subscriptions/{SUB}/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachines/web_8c1f"
    )
    doc["name"] = "web_8c1f"
    del doc["instanceId"]
    instance = parse_instance(doc, OrchestrationMode.FLEXIBLE)
    assert instance.id == instance.name == "web_8c1f"
    assert instance_belongs_to(doc, REF)
    other = ScaleSetRef(SUB, "rg-web", "api")
    assert not instance_belongs_to(doc, other)
    doc["properties"].pop("virtualMachineScaleSet")
    assert not instance_belongs_to(doc, REF)  # a standalone VM


def test_uniform_vm_belongs_by_its_id_case_insensitively() -> None:
    doc = rest_vm()
    doc["id"] = doc["id"].lower()
    assert instance_belongs_to(doc, REF)
    assert not instance_belongs_to(doc, ScaleSetRef(SUB, "rg-web", "web2"))
    assert instance_belongs_to({"instanceId": "3"}, REF)  # nothing to check against


@pytest.mark.parametrize(
    ("codes", "state", "power"),
    [
        (["ProvisioningState/succeeded", "PowerState/deallocated"], "Succeeded", "deallocated"),
        (["ProvisioningState/deleting", "PowerState/running"], "Deleting", "running"),
        (["ProvisioningState/failed/AllocationFailed"], "Failed", "unknown"),
        (["ProvisioningState/creating", "PowerState/starting"], "Creating", "starting"),
        (["PowerState/stopped", "OSState/generalized"], "Succeeded", "stopped"),
        (["PowerState/hibernated"], "Succeeded", "unknown"),
    ],
)
def test_instance_view_statuses(codes, state, power) -> None:
    doc = rest_vm()
    doc["properties"]["instanceView"]["statuses"] = [{"code": code} for code in codes]
    instance = parse_instance(doc, OrchestrationMode.UNIFORM)
    assert instance.provisioning_state == state
    assert instance.power_state == PowerState(power)


@pytest.mark.parametrize(
    ("failure", "counts"),
    [
        ("VMExtensionProvisioningError", True),
        ("ZonalAllocationFailed", False),
        ("OverconstrainedZonalAllocationRequest", False),
        ("AllocationFailed", False),
        (None, True),
    ],
)
def test_the_failure_sub_code_is_kept_and_decides_whether_the_vm_counts(failure, counts) -> None:
    code = f"ProvisioningState/failed/{failure}" if failure else "ProvisioningState/succeeded"
    doc = rest_vm()
    statuses = [{"code": code}, {"code": "PowerState/running"}]
    doc["properties"]["instanceView"]["statuses"] = statuses
    instance = parse_instance(doc, OrchestrationMode.UNIFORM)
    assert instance.failure == failure
    assert instance.counts is counts


def test_model_deleting_state_wins_over_a_stale_instance_view() -> None:
    doc = rest_vm(provisioningState="Deleting")
    assert parse_instance(doc, OrchestrationMode.UNIFORM).deleting


def test_without_instance_view_the_model_state_is_used() -> None:
    doc = rest_vm(provisioningState="Failed")
    del doc["properties"]["instanceView"]
    instance = parse_instance(doc, OrchestrationMode.UNIFORM)
    assert instance.failed
    assert instance.health is Health.NOT_REPORTED


@pytest.mark.parametrize(
    ("code", "health"),
    [
        ("HealthState/healthy", Health.HEALTHY),
        ("HealthState/unhealthy", Health.UNHEALTHY),
        ("HealthState/Unknown", Health.UNKNOWN),
        ("HealthState/initializing", Health.INITIALIZING),
        ("HealthState/somethingNew", Health.UNKNOWN),
    ],
)
def test_health_codes(code, health) -> None:
    doc = rest_vm()
    doc["properties"]["instanceView"]["vmHealth"]["status"]["code"] = code
    assert parse_instance(doc, OrchestrationMode.UNIFORM).health is health


def test_minimal_uniform_vm_defaults() -> None:
    instance = parse_instance({"instanceId": "0"}, OrchestrationMode.UNIFORM)
    assert instance.zone is None
    assert instance.provisioning_state == "Unknown"
    assert instance.latest_model is True
    assert not instance.protected
    assert instance.created is None


def test_uniform_instance_id_falls_back_to_the_resource_id() -> None:
    doc = rest_vm("17")
    del doc["instanceId"]
    assert parse_instance(doc, OrchestrationMode.UNIFORM).id == "17"


def test_vm_without_an_id_is_rejected_with_its_position() -> None:
    docs = [rest_vm("0"), {"name": "", "zones": ["1"]}]
    with pytest.raises(ArmParseError, match="item 1: VM has no 'instanceId'"):
        parse_instances(docs, OrchestrationMode.UNIFORM)
    with pytest.raises(ArmParseError, match="Flexible VM has no 'name'"):
        parse_instance({"zones": ["1"]}, OrchestrationMode.FLEXIBLE)


def test_both_list_forms_give_the_same_instances() -> None:
    docs = [rest_vm("0", "1"), flatten(rest_vm("1", "2"))]
    bare = parse_instances(docs, OrchestrationMode.UNIFORM)
    paged = parse_instances({"value": copy.deepcopy(docs), "nextLink": None}, "Uniform")
    assert bare == paged
    assert [i.id for i in bare] == ["0", "1"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"id": VMSS_ID}, "single object"),
        ("text", "expected a JSON array"),
        ([1], "item 0 is a JSON int"),
    ],
)
def test_instance_lists_that_are_not_lists_are_rejected(doc, message) -> None:
    with pytest.raises(ArmParseError, match=message):
        parse_instances(doc, OrchestrationMode.UNIFORM)


# --- values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PT5M", timedelta(minutes=5)),
        ("PT1H30M", timedelta(hours=1, minutes=30)),
        ("P1DT2S", timedelta(days=1, seconds=2)),
        ("PT", None),
        ("5 minutes", None),
        (None, None),
    ],
)
def test_parse_duration(text, expected) -> None:
    assert parse_duration(text) == expected


def test_parse_time_makes_naive_times_utc_and_ignores_garbage() -> None:
    assert parse_time("2026-01-04T08:00:00") == datetime(2026, 1, 4, 8, tzinfo=UTC)
    assert parse_time("2026-01-04T08:00:00Z") == datetime(2026, 1, 4, 8, tzinfo=UTC)
    assert parse_time("yesterday") is None
    assert parse_time(12) is None


# --- what the compute adapter hands over: azure-mgmt-compute models' as_dict() -----------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("case", ["uniform-2-4-7", "flexible-2-4-7", "uniform-1-3-3"])
def test_sdk_models_as_dict_parse_like_the_rest_json(case: str) -> None:
    from azure.mgmt.compute import models as sdk

    rest_scale = json.loads((EXAMPLES / case / "vmss.json").read_text())
    rest_vms = json.loads((EXAMPLES / case / "instances.json").read_text())["value"]
    scale_model = sdk.VirtualMachineScaleSet(rest_scale)
    vm_type = sdk.VirtualMachineScaleSetVM if case.startswith("uniform") else sdk.VirtualMachine
    vm_models = [vm_type(vm) for vm in rest_vms]
    # the SDK understands the example bodies field by field
    assert scale_model.sku.capacity == len(rest_vms)
    assert all(vm.instance_view.statuses[1].code.startswith("PowerState/") for vm in vm_models)

    scale = parse_scale_set(scale_model.as_dict())
    assert scale == parse_scale_set(rest_scale)
    assert scale.health_monitoring is HealthMonitoring.EXTENSION
    from_sdk = parse_instances([vm.as_dict() for vm in vm_models], scale.mode)
    assert from_sdk == parse_instances(rest_vms, scale.mode)
    assert {i.health for i in from_sdk} >= {Health.HEALTHY}
    assert all(instance_belongs_to(vm.as_dict(), scale.ref) for vm in vm_models)


def test_az_vm_list_show_details_power_state_is_read() -> None:
    doc = flatten(rest_vm(virtualMachineScaleSet={"id": VMSS_ID}))
    del doc["instanceView"]
    doc["powerState"] = "VM deallocated"
    instance = parse_instance(doc, OrchestrationMode.FLEXIBLE)
    assert instance.power_state is PowerState.DEALLOCATED
    assert instance.health is Health.NOT_REPORTED


def test_rolling_upgrade_status_from_the_spec_example():
    body = spec_body("VirtualMachineScaleSetRollingUpgrade_GetLatest_MaximumSet_Gen.json")
    upgrade = parse_rolling_upgrade(body)
    assert upgrade.running and upgrade.status == "RollingForward"
    assert upgrade.started == datetime(2021, 11, 30, 13, 6, 23, 362000, tzinfo=UTC)
    assert (upgrade.in_progress, upgrade.pending) == (20, 27)
    done = copy.deepcopy(body)
    done["properties"]["runningStatus"]["code"] = "Completed"
    assert not parse_rolling_upgrade(done).running
    with pytest.raises(ArmParseError, match="no runningStatus"):
        parse_rolling_upgrade({"properties": {}})


@pytest.mark.parametrize(
    ("policy", "can_roll"),
    [
        (None, False),
        ({"mode": "Manual"}, False),
        ({"mode": "Automatic"}, False),
        ({"mode": "Rolling"}, True),
        ({"mode": "Manual", "automaticOSUpgradePolicy": {"enableAutomaticOSUpgrade": True}}, True),
    ],
)
def test_upgrade_policy_says_whether_upgrades_can_roll(policy, can_roll):
    doc = rest_scale_set(**({"upgradePolicy": policy} if policy else {}))
    assert parse_scale_set(doc).can_roll is can_roll
    assert parse_scale_set(flatten(doc)).can_roll is can_roll


def test_spot_priority_mix_and_instance_mix_are_read_from_the_model() -> None:
    scale = parse_scale_set(
        {
            "id": VMSS_ID,
            "sku": {"name": "Mix", "capacity": 4},
            "properties": {
                "orchestrationMode": "Flexible",
                "virtualMachineProfile": {"priority": "Spot", "evictionPolicy": "Delete"},
                "priorityMixPolicy": {
                    "baseRegularPriorityCount": 2,
                    "regularPriorityPercentageAboveBase": 50,
                },
                "skuProfile": {
                    "vmSizes": [{"name": "Standard_D2s_v5"}, {"name": "Standard_D2as_v5"}],
                    "allocationStrategy": "LowestPrice",
                },
            },
        }
    )
    assert scale.spot and scale.eviction_policy == "Delete"
    assert scale.priority_mix is not None and scale.priority_mix.regular_target(6) == 4
    assert scale.vm_sizes == ("Standard_D2s_v5", "Standard_D2as_v5") and scale.instance_mix
    plain = parse_scale_set({"id": VMSS_ID, "sku": {"name": "Standard_D2s_v5"}})
    assert not plain.spot and plain.priority_mix is None and not plain.instance_mix


@pytest.mark.parametrize(
    ("priority", "spot"), [("Spot", True), ("Low", True), ("Regular", False), (None, False)]
)
def test_a_vm_priority_and_its_standby_pool_flag(priority, spot) -> None:
    doc = rest_vm(virtualMachineScaleSet={"id": VMSS_ID})
    if priority is not None:
        doc["properties"]["priority"] = priority
    doc["properties"]["instanceView"] = {
        "statuses": [{"code": "ProvisioningState/succeeded"}, {"code": "PowerState/running"}],
        "isVMInStandbyPool": True,
    }
    instance = parse_instance(doc, OrchestrationMode.FLEXIBLE)
    assert instance.spot is spot
    assert instance.in_standby_pool and not instance.counts  # a pool VM does not count


def test_the_priority_mix_gives_the_base_first_then_the_regular_share_rounded_up() -> None:
    from rebalancer.model import PriorityMix

    mix = PriorityMix(base_regular=2, regular_percent_above_base=50)
    assert [mix.regular_target(n) for n in range(7)] == [0, 1, 2, 3, 3, 4, 4]
    assert mix.next_spot(regular=2, spot=0, k=4) == (False, True, False, True)
    assert PriorityMix(0, 0).next_spot(regular=0, spot=3, k=2) == (True, True)
