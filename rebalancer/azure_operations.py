"""The Azure operations the rebalancer listens for and the permissions it holds.

One source of truth shared by the Event Grid function (which events matter), the Bicep
templates under `infra/` (the event subscription's filter and the custom roles) and
`docs/deploy.md` (the documented role actions); `tests/test_infra.py` ties them together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

EVENT_GRID_FUNCTION_NAME = "on_resource_event"
"""Name of the Event Grid triggered function; the event subscription targets it by name."""

TIMER_FUNCTION_NAME = "on_timer"
"""Name of the timer triggered function."""

FOLLOW_UP_FUNCTION_NAME = "on_follow_up"
"""Name of the queue triggered function that follows an in-flight operation up."""

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


@dataclass(frozen=True, slots=True)
class ArmRequest:
    """One kind of request an adapter call sends: its method and path, `{...}` for names."""

    method: str
    path: str

    @property
    def action(self) -> str:
        return required_action(self.method, self.path)


def required_action(method: str, path: str) -> str:
    """The Azure RBAC action Resource Manager checks for a request.

    The provider namespace and the resource types along the path, then `read` (GET),
    `write` (PUT, PATCH), `delete` (DELETE), or for a POST the path's last segment and
    `action`: `POST .../virtualMachineScaleSets/web/delete` is
    `Microsoft.Compute/virtualMachineScaleSets/delete/action`.
    """
    segments = [part for part in path.split("?")[0].split("/") if part]
    lowered = [part.lower() for part in segments]
    if "providers" not in lowered:
        raise ValueError(f"{method} {path}: no /providers/<namespace>/ in the path")
    start = len(lowered) - 1 - lowered[::-1].index("providers")
    namespace, rest = segments[start + 1], segments[start + 2 :]
    verb = method.upper()
    if not rest or (verb == "POST" and len(rest) % 2 == 0):
        raise ValueError(f"{method} {path}: no resource type after {namespace}")
    if verb == "POST":
        types, tail = rest[:-1:2], [rest[-1], "action"]
    elif verb in _VERBS:
        types, tail = rest[::2], [_VERBS[verb]]
    else:
        raise ValueError(f"{method} {path}: unsupported method")
    return "/".join([namespace, *types, *tail])


_VERBS = {"GET": "read", "PUT": "write", "PATCH": "write", "DELETE": "delete"}

_SUBSCRIPTION = "/subscriptions/{subscriptionId}/providers/Microsoft.Compute"
_GROUP = (
    "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/providers/Microsoft.Compute"
)
_SCALE_SET = _GROUP + "/virtualMachineScaleSets/{name}"
_LIST_ALL_SCALE_SETS = ArmRequest("GET", _SUBSCRIPTION + "/virtualMachineScaleSets")
_LIST_SCALE_SETS = ArmRequest("GET", _GROUP + "/virtualMachineScaleSets")
_GET_SCALE_SET = ArmRequest("GET", _SCALE_SET)
_LIST_INSTANCES = ArmRequest("GET", _SCALE_SET + "/virtualMachines")  # $expand=instanceView
_GET_INSTANCE = ArmRequest("GET", _SCALE_SET + "/virtualMachines/{instanceId}")
_LIST_FLEXIBLE_VMS = ArmRequest("GET", _GROUP + "/virtualMachines")  # $filter, $expand
_GET_VM = ArmRequest("GET", _GROUP + "/virtualMachines/{vmName}")
_CURRENT_INSTANCES = (_GET_SCALE_SET, _LIST_INSTANCES, _LIST_FLEXIBLE_VMS)

ADAPTER_CALLS: Mapping[str, tuple[ArmRequest, ...]] = MappingProxyType(
    {
        # The whole subscription in one paged list, or resource group by resource group.
        "list_scale_sets": (_LIST_ALL_SCALE_SETS, _LIST_SCALE_SETS),
        "get_scale_set": (_GET_SCALE_SET,),
        # Read only for a scale set that would move and whose upgrade policy can roll.
        "latest_rolling_upgrade": (ArmRequest("GET", _SCALE_SET + "/rollingUpgrades/latest"),),
        # Instance views come with the lists ($expand=instanceView), never one by one; the
        # protection of Flexible VMs only from the scale set's VM GET.
        "read_inventory": (*_CURRENT_INSTANCES, _GET_INSTANCE),
        # A Flexible VM's protection before its delete is written (one GET per VM).
        "read_protection": (_GET_INSTANCE,),
        "audit": (
            _LIST_ALL_SCALE_SETS,
            _LIST_SCALE_SETS,
            _LIST_INSTANCES,
            _LIST_FLEXIBLE_VMS,
            _GET_INSTANCE,
        ),
        # One page of an audit that continues across invocations: the sets were listed.
        "read_inventories": (_LIST_INSTANCES, _LIST_FLEXIBLE_VMS, _GET_INSTANCE),
        # A custom-named Flexible VM's event: the VM names its scale set.
        "vm_scale_set": (_GET_VM,),
        "set_capacity": (ArmRequest("PATCH", _SCALE_SET),),
        # Protection read again per instance; both modes delete through the scale set, which
        # also lowers its capacity (Flexible VMs by name). Missing ids: the set is listed.
        "delete_instances": (
            _GET_INSTANCE,
            ArmRequest("POST", _SCALE_SET + "/delete"),
            *_CURRENT_INSTANCES,
        ),
        # A follow-up watches its new VMs get healthy: one instance view per VM.
        "vm_health": (
            ArmRequest("GET", _SCALE_SET + "/virtualMachines/{instanceId}/instanceView"),
            ArmRequest("GET", _GROUP + "/virtualMachines/{vmName}/instanceView"),
        ),
        "operation_status": (
            ArmRequest("GET", _SUBSCRIPTION + "/locations/{location}/operations/{operationId}"),
        ),
        "quota": (
            ArmRequest("GET", _SUBSCRIPTION + "/skus"),
            ArmRequest("GET", _SUBSCRIPTION + "/locations/{location}/usages"),
        ),
        # Autoscale settings live in any resource group: one list of the subscription.
        "autoscale_settings": (
            ArmRequest(
                "GET",
                "/subscriptions/{subscriptionId}/providers/Microsoft.Insights/autoscalesettings",
            ),
        ),
    }
)
"""Every `ComputeAdapter` call and the requests it can send (tests/test_role_actions.py
records them against armsim). The custom roles hold exactly the actions these need."""

SUBSCRIPTION_READ_CALLS: tuple[str, ...] = ("quota", "autoscale_settings")
"""Calls whose requests only a subscription-scope assignment allows."""


def _actions(calls: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r.action for call in calls for r in ADAPTER_CALLS[call]))


SCALE_SET_ROLE_ACTIONS: tuple[str, ...] = _actions(
    call for call in ADAPTER_CALLS if call not in SUBSCRIPTION_READ_CALLS
)
"""Read, scale and delete instances of scale sets: the role assigned on the managed scope.

`locations/operations/read` polls long-running operations; ARM accepts it from a
resource-group assignment for operations started in that group.
"""

SUBSCRIPTION_READ_ROLE_ACTIONS: tuple[str, ...] = _actions(SUBSCRIPTION_READ_CALLS)
"""Quota, SKU availability and autoscale settings: subscription-level reads, assigned on the
subscription even when the app manages only some resource groups."""

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

LINKED_CHECKS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"set_capacity": LINKED_ACCESS_ROLE_ACTIONS}
)
"""Calls after which ARM checks the caller's access to what the scale set references."""

REQUIRED_ROLE_ACTIONS: tuple[str, ...] = (
    SCALE_SET_ROLE_ACTIONS + SUBSCRIPTION_READ_ROLE_ACTIONS + LINKED_ACCESS_ROLE_ACTIONS
)
"""Every control-plane action the app's identity holds through its custom roles: what the
adapter's calls send, and the linked access checks ARM makes on their behalf."""


def is_handled_operation(operation_name: str | None) -> bool:
    """Whether an event's `data.operationName` is one the app reacts to (case-insensitive)."""
    if not operation_name:
        return False
    return operation_name.lower() in _HANDLED_LOWER


_HANDLED_LOWER = frozenset(name.lower() for name in HANDLED_OPERATION_NAMES)
