"""armsim's answers against the official REST API example bodies (tests/data/arm-examples).

For each example with a body, every field the rebalancer reads that the example has must be
in armsim's answer for the same operation, with the same JSON type and nesting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from armsim import ArmSim, ScaleSetSpec, Scenario, VmOverride
from armsim.auth import make_token

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "arm-examples"
VERSION = "2025-04-01"

SCALE_SET_READS = (
    "id",
    "name",
    "type",
    "location",
    "tags",
    "zones",
    "sku",
    "sku.name",
    "sku.capacity",
    "properties.orchestrationMode",
    "properties.provisioningState",
    "properties.uniqueId",
    "properties.zoneBalance",
    "properties.resiliencyPolicy.automaticZoneRebalancingPolicy.enabled",
    "properties.resiliencyPolicy.automaticZoneRebalancingPolicy.rebalanceStrategy",
    "properties.resiliencyPolicy.automaticZoneRebalancingPolicy.rebalanceBehavior",
    "properties.virtualMachineProfile.extensionProfile.extensions[].name",
    "properties.virtualMachineProfile.extensionProfile.extensions[].properties.type",
    "properties.virtualMachineProfile.networkProfile.healthProbe.id",
    "properties.virtualMachineProfile.scheduledEventsProfile.terminateNotificationProfile.enable",
    "properties.virtualMachineProfile.scheduledEventsProfile.terminateNotificationProfile"
    ".notBeforeTimeout",
)
INSTANCE_VIEW_READS = (
    "statuses[].code",
    "statuses[].level",
    "statuses[].displayStatus",
    "vmHealth.status.code",
    "vmHealth.status.level",
    "vmHealth.status.displayStatus",
    "vmHealth.status.time",
)
SCALE_SET_VM_READS = (
    "id",
    "name",
    "type",
    "location",
    "instanceId",
    "zones",
    "sku.name",
    "properties.latestModelApplied",
    "properties.provisioningState",
    "properties.timeCreated",
    "properties.protectionPolicy.protectFromScaleIn",
    "properties.protectionPolicy.protectFromScaleSetActions",
    *(f"properties.instanceView.{path}" for path in INSTANCE_VIEW_READS),
)
VM_READS = (
    "id",
    "name",
    "type",
    "location",
    "zones",
    "properties.provisioningState",
    "properties.timeCreated",
    "properties.virtualMachineScaleSet.id",
    *(f"properties.instanceView.{path}" for path in INSTANCE_VIEW_READS),
)
SCALE_SET_INSTANCE_VIEW_READS = (
    "statuses[].code",
    "virtualMachine.statusesSummary[].code",
    "virtualMachine.statusesSummary[].count",
)
USAGE_READS = (
    "value[].unit",
    "value[].currentValue",
    "value[].limit",
    "value[].name.value",
    "value[].name.localizedValue",
)


AUTOSCALE_READS = (
    "id",
    "name",
    "type",
    "properties.enabled",
    "properties.targetResourceUri",
    "properties.profiles[].name",
    "properties.profiles[].capacity.minimum",
    "properties.profiles[].capacity.maximum",
    "properties.profiles[].capacity.default",
    "properties.profiles[].rules[].metricTrigger.metricName",
    "properties.profiles[].rules[].metricTrigger.operator",
    "properties.profiles[].rules[].metricTrigger.threshold",
    "properties.profiles[].rules[].scaleAction.direction",
    "properties.profiles[].rules[].scaleAction.type",
    "properties.profiles[].rules[].scaleAction.value",
    "properties.profiles[].rules[].scaleAction.cooldown",
    "properties.profiles[].fixedDate.timeZone",
    "properties.profiles[].fixedDate.start",
    "properties.profiles[].fixedDate.end",
)
ROLLING_UPGRADE_READS = (
    "properties.runningStatus.code",
    "properties.runningStatus.startTime",
    "properties.progress.inProgressInstanceCount",
    "properties.progress.pendingInstanceCount",
)


def listed(paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"value[].{path}" for path in paths)


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Path -> JSON type for every node; list items share the path `name[]`."""
    found: dict[str, str] = {}
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            found[path] = type(inner).__name__
            found.update(flatten(inner, path))
    elif isinstance(value, list):
        for item in value:
            found.update(flatten(item, f"{prefix}[]"))
    return found


@pytest.fixture(scope="module")
def shape_sim() -> Any:
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec(
                "web",
                "rg-web",
                counts={"1": 1, "2": 1, "3": 1},
                tags={"zone-rebalance": "enabled"},
                terminate_notification_seconds=300,
                overrides=(VmOverride(instance="2", protect_from_scale_in=True),),
            ),
            ScaleSetSpec("batch", "rg-web", counts={"1": 1}, health_monitoring="probe"),
            ScaleSetSpec("api", "rg-api", mode="Flexible", counts={"1": 1, "2": 1}),
        )
    )
    with ArmSim.start(scenario) as sim:
        yield sim


def call(sim: ArmSim, method: str, path: str, body: Any = None, **query: str) -> Any:
    token = make_token(sim.scenario.app_principal_id, sim.scenario.tenant_id)
    response = requests.request(
        method,
        f"{sim.endpoint}/subscriptions/{sim.subscription_id}{path}",
        params={"api-version": VERSION, **query},
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        verify=sim.ca_cert_path,
        timeout=10,
    )
    assert response.status_code in (200, 201, 202), response.text
    return response.json()


EXPAND = {"$expand": "instanceView"}
VMSS = "/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachineScaleSets"


def flexible_vm_name(sim: ArmSim) -> str:
    return sim.scale_set("rg-api", "api").vms[0].name


CASES: dict[str, tuple[tuple[str, ...], Callable[[ArmSim], list[Any]]]] = {
    "VirtualMachineScaleSet_Get_WithDiskControllerType.json": (
        SCALE_SET_READS,
        lambda sim: [call(sim, "GET", f"{VMSS}/web"), call(sim, "GET", f"{VMSS}/batch")],
    ),
    "VirtualMachineScaleSet_List_MinimumSet_Gen.json": (
        listed(SCALE_SET_READS),
        lambda sim: [call(sim, "GET", VMSS)],
    ),
    "VirtualMachineScaleSet_ListAll_MinimumSet_Gen.json": (
        listed(SCALE_SET_READS),
        lambda sim: [call(sim, "GET", "/providers/Microsoft.Compute/virtualMachineScaleSets")],
    ),
    "VirtualMachineScaleSet_Update_MaximumSet_Gen.json": (
        SCALE_SET_READS,
        lambda sim: [
            call(sim, "PATCH", f"{VMSS}/web", {"tags": {"zone-rebalance": "enabled"}}),
            call(sim, "PATCH", f"{VMSS}/batch", {"tags": {}}),
        ],
    ),
    "VirtualMachineScaleSet_Create_WithAutomaticZoneRebalancingPolicy.json": (
        SCALE_SET_READS,
        lambda sim: [
            call(
                sim,
                "PUT",
                f"{VMSS}/created",
                {
                    "location": "westeurope",
                    "zones": ["1", "2"],
                    "sku": {"name": "Standard_D2s_v5", "capacity": 2},
                    "properties": {
                        "orchestrationMode": "Uniform",
                        "resiliencyPolicy": {
                            "automaticZoneRebalancingPolicy": {
                                "enabled": True,
                                "rebalanceStrategy": "Recreate",
                                "rebalanceBehavior": "CreateBeforeDelete",
                            }
                        },
                    },
                },
            )
        ],
    ),
    "VirtualMachineScaleSet_GetInstanceView_MaximumSet_Gen.json": (
        SCALE_SET_INSTANCE_VIEW_READS,
        lambda sim: [call(sim, "GET", f"{VMSS}/web/instanceView")],
    ),
    "VirtualMachineScaleSetVM_List_MaximumSet_Gen.json": (
        listed(SCALE_SET_VM_READS),
        lambda sim: [
            call(sim, "GET", f"{VMSS}/web/virtualMachines", **{"$expand": "instanceView"})
        ],
    ),
    "VirtualMachineScaleSetVM_Get_WithVMSizeProperties.json": (
        SCALE_SET_VM_READS,
        lambda sim: [
            call(sim, "GET", f"{VMSS}/web/virtualMachines/2", **{"$expand": "instanceView"})
        ],
    ),
    "VirtualMachineScaleSetVM_Get_WithResilientVMDeletionStatus.json": (
        SCALE_SET_VM_READS,
        lambda sim: [call(sim, "GET", f"{VMSS}/web/virtualMachines/2")],
    ),
    "VirtualMachineScaleSetVM_Get_InstanceViewAutoPlacedOnDedicatedHostGroup.json": (
        INSTANCE_VIEW_READS,
        lambda sim: [call(sim, "GET", f"{VMSS}/web/virtualMachines/2/instanceView")],
    ),
    "VirtualMachineScaleSetVM_Update_MinimumSet_Gen.json": (
        SCALE_SET_VM_READS,
        lambda sim: [
            call(
                sim,
                "PUT",
                f"{VMSS}/web/virtualMachines/2",
                {
                    "location": "westeurope",
                    "properties": {"protectionPolicy": {"protectFromScaleIn": True}},
                },
            )
        ],
    ),
    "VirtualMachine_List_MaximumSet_Gen.json": (
        listed(VM_READS),
        lambda sim: [
            call(
                sim,
                "GET",
                "/resourceGroups/rg-api/providers/Microsoft.Compute/virtualMachines",
                **{
                    "$filter": "'virtualMachineScaleSet/id' eq "
                    f"'{sim.scale_set('rg-api', 'api').id}'",
                    "$expand": "instanceView",
                },
            )
        ],
    ),
    "VirtualMachine_Get_InstanceView.json": (
        INSTANCE_VIEW_READS,
        lambda sim: [
            call(
                sim,
                "GET",
                "/resourceGroups/rg-api/providers/Microsoft.Compute/virtualMachines/"
                f"{flexible_vm_name(sim)}/instanceView",
            )
        ],
    ),
    "Usage_List_MaximumSet_Gen.json": (
        USAGE_READS,
        lambda sim: [call(sim, "GET", "/providers/Microsoft.Compute/locations/westeurope/usages")],
    ),
    "VirtualMachineScaleSetRollingUpgrade_GetLatest_MaximumSet_Gen.json": (
        ROLLING_UPGRADE_READS,
        lambda sim: [upgrading(sim) and call(sim, "GET", VMSS + "/batch/rollingUpgrades/latest")],
    ),
    "listAutoscaleSetting.json": (
        listed(AUTOSCALE_READS),
        lambda sim: [
            autoscaled(sim) and call(sim, "GET", "/providers/Microsoft.Insights/autoscalesettings")
        ],
    ),
}


def upgrading(sim: ArmSim) -> bool:
    """A rolling upgrade running on `batch` (its policy set to Rolling first)."""
    policy = {"properties": {"upgradePolicy": {"mode": "Rolling"}}}
    sim.actor.update_scale_set("rg-web", "batch", policy)
    sim.advance(30)
    return sim.upgrades.start("rg-web", "batch").status == "RollingForward"


def autoscaled(sim: ArmSim) -> bool:
    """An autoscale setting on `web` with a scale-out rule and a fixed-date profile."""
    rule = {
        "metricTrigger": {
            "metricName": "Percentage CPU",
            "metricResourceUri": sim.scale_set("rg-web", "web").id,
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
            "value": "1",
            "cooldown": "PT5M",
        },
    }
    event = {
        "name": "launch",
        "capacity": {"minimum": "10", "maximum": "20", "default": "10"},
        "rules": [rule],
        "fixedDate": {
            "timeZone": "UTC",
            "start": "2026-12-24T00:00:00Z",
            "end": "2026-12-26T00:00:00Z",
        },
    }
    sim.autoscale.put(
        "rg-web",
        "web-autoscale",
        target=sim.scale_set("rg-web", "web").id,
        minimum=2,
        maximum=20,
        rules=(rule,),
        profiles=(event,),
    )
    return True


@pytest.mark.parametrize("example", sorted(CASES))
def test_answer_has_the_example_fields_the_rebalancer_reads(
    shape_sim: ArmSim, example: str
) -> None:
    reads, fetch = CASES[example]
    document = json.loads((EXAMPLES / example).read_text())
    bodies = [r["body"] for r in document["responses"].values() if r.get("body")]
    assert bodies, f"{example} has no response body"
    ours: dict[str, set[str]] = {}
    for answer in fetch(shape_sim):
        for path, kind in flatten(answer).items():
            ours.setdefault(path, set()).add(kind)
    checked = 0
    for body in bodies:
        theirs = flatten(body)
        for path in reads:
            if path not in theirs:
                continue
            checked += 1
            assert path in ours, f"{example}: armsim's answer lacks {path}"
            assert theirs[path] in ours[path], (
                f"{example}: {path} is {ours[path]} in armsim, {theirs[path]} in the example"
            )
    assert checked > 0, f"{example}: none of the read fields is in the example"


def test_every_example_with_a_body_is_covered() -> None:
    with_bodies = {
        path.name
        for path in EXAMPLES.glob("*.json")
        if any(r.get("body") for r in json.loads(path.read_text())["responses"].values())
    }
    assert with_bodies <= set(CASES)
