"""The Azure operations the rebalancer listens for and the permissions it holds.

One source of truth shared by the Event Grid function (which events matter), the Bicep
templates under `infra/` (the event subscription's filter and the custom roles) and
`docs/deploy.md` (the documented role actions); `tests/test_infra.py` ties them together.
"""

from __future__ import annotations

EVENT_GRID_FUNCTION_NAME = "on_resource_event"
"""Name of the Event Grid triggered function; the event subscription targets it by name."""

HANDLED_EVENT_TYPES: tuple[str, ...] = (
    "Microsoft.Resources.ResourceWriteSuccess",
    "Microsoft.Resources.ResourceDeleteSuccess",
    "Microsoft.Resources.ResourceActionSuccess",
)
"""Event Grid event types of the subscription system topic that the app subscribes to."""

HANDLED_OPERATION_NAMES: tuple[str, ...] = (
    # Capacity and model of a scale set, including autoscale and manual capacity changes.
    "Microsoft.Compute/virtualMachineScaleSets/write",
    # The scale set itself went away: in-flight operations on it must stop.
    "Microsoft.Compute/virtualMachineScaleSets/delete",
    # Instances deleted through the scale set (POST .../delete with instance ids).
    "Microsoft.Compute/virtualMachineScaleSets/delete/action",
    # Uniform instances written or deleted one by one.
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write",
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/delete",
    # Flexible scale set members are plain VMs.
    "Microsoft.Compute/virtualMachines/write",
    "Microsoft.Compute/virtualMachines/delete",
    # Power changes move VMs in or out of the active count, which gates every move.
    "Microsoft.Compute/virtualMachineScaleSets/deallocate/action",
    "Microsoft.Compute/virtualMachineScaleSets/powerOff/action",
    "Microsoft.Compute/virtualMachineScaleSets/start/action",
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/deallocate/action",
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/powerOff/action",
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/start/action",
    "Microsoft.Compute/virtualMachines/deallocate/action",
    "Microsoft.Compute/virtualMachines/powerOff/action",
    "Microsoft.Compute/virtualMachines/start/action",
)
"""`data.operationName` values the Event Grid function reacts to (compare case-insensitively)."""

SCALE_SET_ROLE_ACTIONS: tuple[str, ...] = (
    "Microsoft.Compute/virtualMachineScaleSets/read",
    "Microsoft.Compute/virtualMachineScaleSets/write",
    "Microsoft.Compute/virtualMachineScaleSets/delete/action",
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read",
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/instanceView/read",
    "Microsoft.Compute/virtualMachines/read",
    "Microsoft.Compute/virtualMachines/instanceView/read",
    "Microsoft.Compute/virtualMachines/delete",
    "Microsoft.Compute/locations/operations/read",
)
"""Read, scale and delete instances of scale sets: the role assigned on the managed scope.

`locations/operations/read` polls long-running operations; ARM accepts it from a
resource-group assignment for operations started in that group.
"""

SUBSCRIPTION_READ_ROLE_ACTIONS: tuple[str, ...] = (
    "Microsoft.Compute/locations/usages/read",
    "Microsoft.Compute/skus/read",
)
"""Quota and SKU availability: subscription-level reads, assigned on the subscription even
when the app manages only some resource groups."""

LINKED_ACCESS_ROLE_ACTIONS: tuple[str, ...] = (
    "Microsoft.Network/virtualNetworks/subnets/join/action",
    "Microsoft.Network/networkSecurityGroups/join/action",
    "Microsoft.Network/applicationSecurityGroups/joinIpConfiguration/action",
    "Microsoft.Network/loadBalancers/backendAddressPools/join/action",
    "Microsoft.Network/loadBalancers/inboundNatPools/join/action",
    "Microsoft.Network/loadBalancers/probes/join/action",
    "Microsoft.Network/applicationGateways/backendAddressPools/join/action",
    "Microsoft.Network/publicIPPrefixes/join/action",
    "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action",
    "Microsoft.Compute/galleries/images/read",
    "Microsoft.Compute/galleries/images/versions/read",
    "Microsoft.Compute/images/read",
    "Microsoft.Compute/diskEncryptionSets/read",
)
"""Linked access checks ARM repeats on a capacity change for what the scale set references.

Without them a scale-out fails with `LinkedAuthorizationFailed`. They are a separate role so
that it can also be assigned where the networks, images and identities live (often another
resource group) without granting scale set writes there.
"""

REQUIRED_ROLE_ACTIONS: tuple[str, ...] = (
    SCALE_SET_ROLE_ACTIONS + SUBSCRIPTION_READ_ROLE_ACTIONS + LINKED_ACCESS_ROLE_ACTIONS
)
"""Every control-plane action the app's identity holds through its custom roles."""


def is_handled_operation(operation_name: str | None) -> bool:
    """Whether an event's `data.operationName` is one the app reacts to (case-insensitive)."""
    if not operation_name:
        return False
    return operation_name.lower() in _HANDLED_LOWER


_HANDLED_LOWER = frozenset(name.lower() for name in HANDLED_OPERATION_NAMES)
