"""The simulated resources: scale sets, their VMs, long-running operations, callers.

Plain mutable records owned by `World` (which holds the lock); the server and the Python API
only read them through snapshots (`armsim.simulator`) or rendering (`armsim.render`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from armsim.errors import ArmError, OperationFailure

VMSS_TYPE = "Microsoft.Compute/virtualMachineScaleSets"
VM_TYPE = "Microsoft.Compute/virtualMachines"
DEFAULT_LIMIT = 100_000

ALLOCATION_FAILURES = frozenset(
    code.lower()
    for code in (
        "ZonalAllocationFailed",
        "AllocationFailed",
        "OverconstrainedZonalAllocationRequest",
        "OverconstrainedAllocationRequest",
        "SkuNotAvailable",
    )
)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a write, as Event Grid reports it."""

    principal_id: str
    claims: Mapping[str, str]
    method: str
    url: str
    client_request_id: str
    correlation_id: str
    client_ip: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class VmChange:
    """One entry of the VM journal: what happened to a VM, when, and who caused it."""

    time: datetime
    scale_set_id: str
    instance_id: str
    zone: str | None
    change: str
    """created, provisioned, failed, health, deleting, deleted, power, protection."""
    value: str | None
    """The new health, power state or failure code, where the change has one."""
    health: str | None
    """The VM's health at the time (after the change)."""
    protected: bool
    """Protected from scale-in or from scale set actions at the time."""
    principal_id: str | None
    """Caller of the operation behind the change (None for the platform's own steps)."""


@dataclass(frozen=True, slots=True)
class CapacityChange:
    """One entry of the capacity journal: a change of a scale set's `sku.capacity`, and why."""

    time: datetime
    scale_set_id: str
    capacity: int
    """`sku.capacity` after the change."""
    change: str
    """`write`: a PUT or PATCH set `sku.capacity` (absolute); `delete`: deleting one VM (by
    the VM or the VMSS-VM API, or `delete_instances`) lowered it by one."""
    instance_id: str | None
    """The deleted VM (`delete` only)."""
    principal_id: str | None


@dataclass(eq=False)
class Vm:
    serial: int
    scale_set: ScaleSetState
    instance_id: str
    """Uniform: "0", "1", ...; Flexible: the VM name (what delete_instances takes)."""
    name: str
    zone: str | None
    vm_id: str
    created: datetime
    provisioning_state: str = "Creating"
    power_state: str = "starting"
    health: str | None = None
    protect_from_scale_in: bool = False
    protect_from_scale_set_actions: bool = False
    latest_model: bool = True
    failure: OperationFailure | None = None
    allocated: bool = False
    """Holds a zone capacity slot and counts in quota usage."""
    spot: bool = False
    """Spot priority: its vCPUs count in `lowPriorityCores`, and Azure may evict it."""
    in_standby_pool: bool = False
    """Waits in the scale set's standby pool: no place in `sku.capacity`, not counted."""
    gone: bool = False
    waiters: set[Operation] = field(default_factory=set)

    @property
    def never_allocated(self) -> bool:
        """Failed for lack of capacity: the VM never got a host (no power state, no slot)."""
        return (
            self.provisioning_state == "Failed"
            and self.failure is not None
            and self.failure.code.lower() in ALLOCATION_FAILURES
        )

    @property
    def counts(self) -> bool:
        """Counts toward zone balance as Azure counts it: a VM whose extensions failed does,
        one that never got capacity does not (Azure's "Zone balancing" page)."""
        return (
            self.provisioning_state != "Deleting"
            and not self.never_allocated
            and not self.gone
            and not self.in_standby_pool
        )

    @property
    def resource_id(self) -> str:
        ss = self.scale_set
        if ss.mode == "Flexible":
            return (
                f"/subscriptions/{ss.subscription_id}/resourceGroups/{ss.resource_group}"
                f"/providers/{VM_TYPE}/{self.name}"
            )
        return f"{ss.resource_id}/virtualMachines/{self.instance_id}"

    def sort_key(self) -> tuple[int, int | str]:
        return (0, int(self.instance_id)) if self.instance_id.isdigit() else (1, self.serial)


@dataclass(eq=False)
class ScaleSetState:
    subscription_id: str
    resource_group: str
    name: str
    location: str
    mode: str
    sku: str
    zones: tuple[str, ...]
    capacity: int
    tags: dict[str, str]
    health_monitoring: str
    platform_rebalancing: bool
    zone_balance: bool
    terminate_notification_seconds: int | None
    new_vm_health: str
    unique_id: str
    created: datetime
    provisioning_state: str = "Succeeded"
    overprovision: bool = False
    """Uniform scale-outs create extra VMs and delete them once the requested ones succeeded."""
    health_states: str = "rich"
    """The health extension's mode: `rich` (four states) or `binary` (healthy/unhealthy)."""
    version: int = 1
    """Bumped by every write of the model or the capacity; the ETag is `"<version>"`."""
    vms: dict[str, Vm] = field(default_factory=dict)
    next_instance_id: int = 0
    model_op: Operation | None = None
    active_ops: int = 0
    hold: ArmError | None = None
    deleted: bool = False
    extra_model: dict[str, Any] = field(default_factory=dict)
    pending_extras: int = 0
    """Overprovisioned VMs still among the members until their scale-out picks which go."""
    upgrade_policy: dict[str, Any] = field(default_factory=lambda: {"mode": "Manual"})
    """`properties.upgradePolicy` as last written (Azure's default mode is Manual)."""
    repairs_policy: dict[str, Any] | None = None
    """`properties.automaticRepairsPolicy` with defaults filled in (armsim/repairs.py)."""
    priority: str = "Regular"
    eviction_policy: str = "Deallocate"
    priority_mix: tuple[int, int] | None = None
    """`priorityMixPolicy`: (baseRegularPriorityCount, regularPriorityPercentageAboveBase)."""
    vm_sizes: tuple[str, ...] = ()
    """Instance mix (`skuProfile.vmSizes`); `sku` is then the size its VMs get."""

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/{VMSS_TYPE}/{self.name}"
        )

    @property
    def key(self) -> str:
        return f"{self.resource_group}/{self.name}".lower()

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    def members(self) -> list[Vm]:
        """VMs that hold a place in `sku.capacity` (everything not being deleted)."""
        return [
            vm
            for vm in self.vms.values()
            if vm.provisioning_state != "Deleting" and not vm.in_standby_pool
        ]

    def next_spot(self) -> bool:
        """Whether the next VM a scale-out creates is Spot: all of a Spot set's, or as the
        priority mix keeps the split (the regular share above the base rounded up)."""
        if self.priority_mix is None:
            return self.priority == "Spot"
        base, percent = self.priority_mix
        members = [vm for vm in self.members() if not vm.never_allocated]
        regular = sum(1 for vm in members if not vm.spot)
        count = len(members) + 1
        target = min(count, base) + -(-max(0, count - base) * percent // 100)
        return regular >= target

    def held(self) -> int:
        """Places of `sku.capacity` taken: members, less overprovisioned extras to go."""
        return len(self.members()) - self.pending_extras

    def zone_counts(self) -> dict[str | None, int]:
        counts: dict[str | None, int] = dict.fromkeys(self.zones or (None,), 0)
        for vm in self.vms.values():
            if vm.counts:
                counts[vm.zone] = counts.get(vm.zone, 0) + 1
        return counts


@dataclass(eq=False)
class Operation:
    id: str
    kind: str
    """`write`, `delete` or `action`: which Event Grid event type family it ends in."""
    operation_name: str
    resource_id: str
    location: str
    caller: Caller
    start: datetime
    scale_set: ScaleSetState | None
    not_before: datetime
    result: str | None = None
    """What the `Location` monitor answers when done: `vmss` (the scale set), or None."""
    status: str = "InProgress"
    end: datetime | None = None
    failure: OperationFailure | None = None
    pending_failure: OperationFailure | None = None
    waiting: dict[int, str] = field(default_factory=dict)
    """VM serial -> what the operation waits for: `provisioned` or `gone`."""
    on_done: list[Callable[[Operation], None]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status != "InProgress"
