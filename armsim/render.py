"""World state -> ARM JSON, shaped as the Azure REST API specification's examples.

Only the parts of each resource that the rebalancer (or a person looking at the answer)
needs are filled in; their names, types and nesting follow the 2025-04-01+ specifications
so that azure-mgmt-compute models deserialize every field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from armsim.clock import iso
from armsim.resources import VM_TYPE, VMSS_TYPE, Operation, ScaleSetState, Vm
from armsim.scenario import SkuSpec

HEALTH_EXTENSION = "ApplicationHealthLinux"
_HEALTH_TEXT = {
    "healthy": "The VM is healthy",
    "unhealthy": "The VM is unhealthy",
    "unknown": "The VM health is unknown",
    "initializing": "The VM health is initializing",
}
_POWER_TEXT = {
    "starting": "VM starting",
    "running": "VM running",
    "stopping": "VM stopping",
    "stopped": "VM stopped",
    "deallocating": "VM deallocating",
    "deallocated": "VM deallocated",
}


def _network_base(ss: ScaleSetState) -> str:
    return (
        f"/subscriptions/{ss.subscription_id}/resourceGroups/{ss.resource_group}"
        "/providers/Microsoft.Network"
    )


def scale_set(ss: ScaleSetState) -> dict[str, Any]:
    network = _network_base(ss)
    profile: dict[str, Any] = {
        "osProfile": {
            "computerNamePrefix": ss.name[:9],
            "adminUsername": "azureuser",
            "linuxConfiguration": {"disablePasswordAuthentication": True},
        },
        "storageProfile": {
            "imageReference": {
                "publisher": "Canonical",
                "offer": "ubuntu-24_04-lts",
                "sku": "server",
                "version": "latest",
            },
            "osDisk": {
                "createOption": "FromImage",
                "caching": "ReadWrite",
                "managedDisk": {"storageAccountType": "Premium_LRS"},
                "diskSizeGB": 30,
            },
            "dataDisks": [],
        },
        "networkProfile": {
            "networkInterfaceConfigurations": [
                {
                    "name": f"{ss.name}-nic",
                    "properties": {
                        "primary": True,
                        "ipConfigurations": [
                            {
                                "name": f"{ss.name}-ipconfig",
                                "properties": {
                                    "primary": True,
                                    "subnet": {
                                        "id": f"{network}/virtualNetworks/vnet/subnets/default"
                                    },
                                },
                            }
                        ],
                    },
                }
            ]
        },
    }
    if ss.mode == "Flexible":
        profile["networkProfile"]["networkApiVersion"] = "2020-11-01"
    if ss.health_monitoring == "probe":
        profile["networkProfile"]["healthProbe"] = {
            "id": f"{network}/loadBalancers/{ss.name}-lb/probes/health"
        }
    if ss.health_monitoring == "extension":
        profile["extensionProfile"] = {
            "extensions": [
                {
                    "name": "HealthExtension",
                    "properties": {
                        "publisher": "Microsoft.ManagedServices",
                        "type": HEALTH_EXTENSION,
                        "typeHandlerVersion": "2.0",
                        "autoUpgradeMinorVersion": True,
                        "settings": {"protocol": "http", "port": 80, "requestPath": "/health"},
                    },
                }
            ]
        }
    if ss.priority == "Spot":
        profile["priority"] = "Spot"
        profile["evictionPolicy"] = ss.eviction_policy
        profile["billingProfile"] = {"maxPrice": -1}
    if ss.terminate_notification_seconds is not None:
        profile["scheduledEventsProfile"] = {
            "terminateNotificationProfile": {
                "notBeforeTimeout": _duration(ss.terminate_notification_seconds),
                "enable": True,
            }
        }
    properties: dict[str, Any] = {
        "singlePlacementGroup": False,
        "orchestrationMode": ss.mode,
        "virtualMachineProfile": profile,
        "provisioningState": ss.provisioning_state,
        "platformFaultDomainCount": 1,
        "uniqueId": ss.unique_id,
        "timeCreated": iso(ss.created),
        "scaleInPolicy": {"rules": ["Default"], "forceDeletion": False},
        "resiliencyPolicy": {
            "resilientVMCreationPolicy": {"enabled": False},
            "resilientVMDeletionPolicy": {"enabled": False},
            "automaticZoneRebalancingPolicy": {
                "enabled": ss.platform_rebalancing,
                "rebalanceStrategy": "Recreate",
                "rebalanceBehavior": "CreateBeforeDelete",
            },
        },
    }
    if ss.mode == "Uniform" or ss.upgrade_policy != {"mode": "Manual"}:
        properties["upgradePolicy"] = dict(ss.upgrade_policy)
    if ss.repairs_policy is not None:
        properties["automaticRepairsPolicy"] = dict(ss.repairs_policy)
    if ss.mode == "Uniform":
        properties["overprovision"] = ss.overprovision
        properties["doNotRunExtensionsOnOverprovisionedVMs"] = False
    if ss.zones:
        properties["zoneBalance"] = ss.zone_balance
    if ss.priority_mix is not None:
        properties["priorityMixPolicy"] = {
            "baseRegularPriorityCount": ss.priority_mix[0],
            "regularPriorityPercentageAboveBase": ss.priority_mix[1],
        }
    sku: dict[str, Any] = {"name": ss.sku, "tier": "Standard", "capacity": ss.capacity}
    if ss.vm_sizes:
        sku = {"name": "Mix", "capacity": ss.capacity}
        properties["skuProfile"] = {
            "vmSizes": [{"name": size} for size in ss.vm_sizes],
            "allocationStrategy": "LowestPrice",
        }
    body: dict[str, Any] = {
        "name": ss.name,
        "id": ss.resource_id,
        "type": VMSS_TYPE,
        "location": ss.location,
        "tags": dict(ss.tags),
        "sku": sku,
        "etag": ss.etag,
        "properties": properties,
    }
    if ss.zones:
        body["zones"] = list(ss.zones)
    return body


def _duration(seconds: int) -> str:
    minutes, secs = divmod(seconds, 60)
    if secs:
        return f"PT{minutes}M{secs}S" if minutes else f"PT{secs}S"
    return f"PT{minutes}M"


def _status(code: str, display: str, at: datetime | None, level: str = "Info") -> dict[str, Any]:
    status: dict[str, Any] = {"code": code, "level": level, "displayStatus": display}
    if at is not None:
        status["time"] = iso(at)
    return status


def reported_health(vm: Vm) -> str | None:
    """The health the extension reports: binary mode knows only healthy and unhealthy, so a
    VM still initializing (or unknown) reads unhealthy there."""
    if vm.health is None or vm.scale_set.health_states != "binary":
        return vm.health
    return "healthy" if vm.health == "healthy" else "unhealthy"


def instance_view(
    vm: Vm, now: datetime, *, health: bool = True, failure_code: bool = True
) -> dict[str, Any]:
    """`health=False`: without `vmHealth`, as a list answer that does not surface it;
    `failure_code=False`: a failed VM's status without its sub-code and message."""
    statuses: list[dict[str, Any]] = []
    state = vm.provisioning_state
    if state == "Failed":
        failure = vm.failure
        code = f"ProvisioningState/failed/{failure.code if failure else 'Unknown'}"
        if not failure_code:
            code = "ProvisioningState/failed"
        status = _status(code, "Provisioning failed", now, "Error")
        if failure is not None and failure_code:
            status["message"] = failure.message
        statuses.append(status)
    elif state == "Succeeded":
        statuses.append(_status("ProvisioningState/succeeded", "Provisioning succeeded", now))
    else:
        statuses.append(_status(f"ProvisioningState/{state.lower()}", state, None))
    if not vm.never_allocated:
        statuses.append(_status(f"PowerState/{vm.power_state}", _POWER_TEXT[vm.power_state], None))
    view: dict[str, Any] = {
        "platformUpdateDomain": 0,
        "platformFaultDomain": 0,
        "computerName": vm.name.replace("_", "")[:15],
        "osName": "ubuntu",
        "osVersion": "24.04",
        "statuses": statuses,
    }
    if vm.power_state == "running" and state == "Succeeded":
        view["vmAgent"] = {
            "vmAgentVersion": "2.12.0.2",
            "statuses": [
                {
                    "code": "ProvisioningState/succeeded",
                    "level": "Info",
                    "displayStatus": "Ready",
                    "message": "Guest Agent is running",
                    "time": iso(now),
                }
            ],
        }
    if vm.in_standby_pool:
        view["isVMInStandbyPool"] = True
    reported = reported_health(vm)
    if reported is not None and health:
        view["vmHealth"] = {
            "status": _status(f"HealthState/{reported}", _HEALTH_TEXT[reported], now)
        }
    return view


def _os_and_network(vm: Vm) -> dict[str, Any]:
    ss = vm.scale_set
    network = _network_base(ss)
    return {
        "osProfile": {
            "computerName": vm.name.replace("_", "")[:15],
            "adminUsername": "azureuser",
            "linuxConfiguration": {"disablePasswordAuthentication": True},
        },
        "networkProfile": {
            "networkInterfaces": [{"id": f"{network}/networkInterfaces/{vm.name}-nic"}]
        },
        "storageProfile": {
            "imageReference": {
                "publisher": "Canonical",
                "offer": "ubuntu-24_04-lts",
                "sku": "server",
                "version": "latest",
            },
            "osDisk": {
                "osType": "Linux",
                "name": f"{vm.name}_OsDisk_1",
                "createOption": "FromImage",
                "caching": "ReadWrite",
                "managedDisk": {"storageAccountType": "Premium_LRS"},
                "diskSizeGB": 30,
            },
            "dataDisks": [],
        },
    }


def scale_set_vm(
    vm: Vm, now: datetime, expand: bool, *, health: bool = True, failure_code: bool = True
) -> dict[str, Any]:
    """A VM as the VMSS-VM API shows it (Uniform, or Flexible by VM name)."""
    ss = vm.scale_set
    properties: dict[str, Any] = {
        "latestModelApplied": vm.latest_model,
        "modelDefinitionApplied": "VirtualMachineScaleSet",
        "vmId": vm.vm_id,
        "hardwareProfile": {"vmSize": ss.sku},
        **_os_and_network(vm),
        "provisioningState": vm.provisioning_state,
        "timeCreated": iso(vm.created),
    }
    if vm.protect_from_scale_in or vm.protect_from_scale_set_actions:
        properties["protectionPolicy"] = {
            "protectFromScaleIn": vm.protect_from_scale_in,
            "protectFromScaleSetActions": vm.protect_from_scale_set_actions,
        }
    if expand:
        properties["instanceView"] = instance_view(
            vm, now, health=health, failure_code=failure_code
        )
    body: dict[str, Any] = {
        "name": vm.name,
        "id": f"{ss.resource_id}/virtualMachines/{vm.instance_id}",
        "type": f"{VMSS_TYPE}/virtualMachines",
        "location": ss.location,
        "tags": {},
        "instanceId": vm.instance_id,
        "sku": {"name": ss.sku, "tier": "Standard"},
        "properties": properties,
    }
    if vm.zone:
        body["zones"] = [vm.zone]
    return body


def _priority(vm: Vm) -> dict[str, Any]:
    """A Flexible VM's own `priority` (and a Spot VM's `evictionPolicy`); a regular VM of a
    set without Spot shows none."""
    ss = vm.scale_set
    if not vm.spot and ss.priority != "Spot":
        return {}
    if not vm.spot:
        return {"priority": "Regular"}
    return {
        "priority": "Spot",
        "evictionPolicy": ss.eviction_policy,
        "billingProfile": {"maxPrice": -1},
    }


def bare_scale_set_vm(vm: Vm) -> dict[str, Any]:
    """A Flexible VM in the scale-set-VM *list*: Azure answers it with items that carry no
    properties (no instance view, no protection); the VM's own APIs have those."""
    ss = vm.scale_set
    return {
        "name": vm.name,
        "id": f"{ss.resource_id}/virtualMachines/{vm.instance_id}",
        "type": f"{VMSS_TYPE}/virtualMachines",
        "location": ss.location,
        "instanceId": vm.instance_id,
    }


def virtual_machine(
    vm: Vm, now: datetime, expand: bool, *, health: bool = True, failure_code: bool = True
) -> dict[str, Any]:
    """A Flexible scale set's VM as the virtualMachines API shows it (no protectionPolicy)."""
    ss = vm.scale_set
    properties: dict[str, Any] = {
        "vmId": vm.vm_id,
        "hardwareProfile": {"vmSize": ss.sku},
        **_os_and_network(vm),
        "virtualMachineScaleSet": {"id": ss.resource_id},
        "provisioningState": vm.provisioning_state,
        **_priority(vm),
        "timeCreated": iso(vm.created),
    }
    if expand:
        properties["instanceView"] = instance_view(
            vm, now, health=health, failure_code=failure_code
        )
    body: dict[str, Any] = {
        "name": vm.name,
        "id": vm.resource_id,
        "type": VM_TYPE,
        "location": ss.location,
        "tags": {},
        "properties": properties,
    }
    if vm.zone:
        body["zones"] = [vm.zone]
    return body


def scale_set_instance_view(ss: ScaleSetState, now: datetime) -> dict[str, Any]:
    summary: dict[str, int] = {}
    for vm in ss.vms.values():
        code = f"ProvisioningState/{vm.provisioning_state.lower()}"
        summary[code] = summary.get(code, 0) + 1
    body: dict[str, Any] = {
        "virtualMachine": {
            "statusesSummary": [{"code": code, "count": count} for code, count in summary.items()]
        },
        "statuses": [
            _status(
                f"ProvisioningState/{ss.provisioning_state.lower()}",
                f"Provisioning {ss.provisioning_state.lower()}",
                now,
            )
        ],
    }
    if ss.health_monitoring == "extension":
        healthy = sum(1 for vm in ss.vms.values() if vm.health == "healthy")
        body["extensions"] = [
            {
                "name": "HealthExtension",
                "statusesSummary": [
                    {"code": "ProvisioningState/succeeded", "count": healthy},
                ],
            }
        ]
    return body


def operation_status(op: Operation) -> dict[str, Any]:
    body: dict[str, Any] = {"startTime": iso(op.start), "status": op.status, "name": op.id}
    if op.end is not None:
        body["endTime"] = iso(op.end)
    if op.failure is not None:
        body["error"] = op.failure.to_json()
    return body


def usages(rows: list[tuple[str, str, int, int]]) -> dict[str, Any]:
    return {
        "value": [
            {
                "unit": "Count",
                "currentValue": current,
                "limit": limit,
                "name": {"value": name, "localizedValue": localized},
            }
            for name, localized, current, limit in rows
        ]
    }


def resource_skus(entries: list[tuple[SkuSpec, str]]) -> dict[str, Any]:
    """The `skus` list: one entry per size and location, with vCPUs and restrictions."""
    value = []
    for sku, location in entries:
        restricted = location.lower() in {loc.lower() for loc in sku.unavailable_locations}
        restrictions = []
        if restricted:
            restrictions.append(
                {
                    "type": "Location",
                    "values": [location],
                    "restrictionInfo": {"locations": [location]},
                    "reasonCode": "NotAvailableForSubscription",
                }
            )
        size = sku.name.split("_", 1)[-1]
        value.append(
            {
                "resourceType": "virtualMachines",
                "name": sku.name,
                "tier": "Standard",
                "size": size,
                "family": sku.family,
                "locations": [location],
                "locationInfo": [
                    {"location": location, "zones": ["1", "2", "3"], "zoneDetails": []}
                ],
                "capabilities": [
                    {"name": "vCPUs", "value": str(sku.vcpus)},
                    {"name": "vCPUsAvailable", "value": str(sku.vcpus)},
                    {"name": "MemoryGB", "value": str(sku.vcpus * 4)},
                ],
                "restrictions": restrictions,
            }
        )
    return {"value": value}
