"""Typed, immutable domain values: what a scale set and its VMs look like to the rebalancer.

Nothing here knows about the Azure SDK: adapters turn ARM JSON into these values
(see `rebalancer.arm`), and the pure core (evaluator, operation) works only on them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from math import ceil
from types import MappingProxyType

_SCALE_SET_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)"
    r"/providers/microsoft\.compute/virtualmachinescalesets/(?P<name>[^/]+)",
    re.IGNORECASE,
)


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
"""Failure codes of a VM that never got capacity (Azure found no room for it)."""


class OrchestrationMode(StrEnum):
    UNIFORM = "Uniform"
    FLEXIBLE = "Flexible"


class PowerState(StrEnum):
    """`PowerState/*` codes of a VM's instance view."""

    RUNNING = "running"
    STARTING = "starting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DEALLOCATING = "deallocating"
    DEALLOCATED = "deallocated"
    UNKNOWN = "unknown"


class Health(StrEnum):
    """`HealthState/*` codes reported by the Application Health extension or an LB probe.

    Health is three-valued in every decision: observed healthy (`HEALTHY`), observed
    unhealthy (`UNHEALTHY`), or not known (`UNKNOWN`, `INITIALIZING`, and `NOT_REPORTED`:
    the instance view carried no health at all). Only observed health justifies an act: a
    new VM must be seen healthy, a source seen unhealthy (see `Instance.observed_unhealthy`).
    The extension's binary mode knows only healthy and unhealthy (a warming VM reads
    unhealthy); its rich mode adds initializing and unknown.
    """

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"
    INITIALIZING = "initializing"
    NOT_REPORTED = "notReported"


class HealthMonitoring(StrEnum):
    EXTENSION = "applicationHealthExtension"
    LOAD_BALANCER_PROBE = "loadBalancerProbe"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class ScaleSetRef:
    """Identity of a scale set. Resource ids arrive in mixed case: compare by `key`."""

    subscription_id: str
    resource_group: str
    name: str

    @classmethod
    def parse(cls, resource_id: str) -> ScaleSetRef:
        """Parse a scale set id, or the id of anything below it (a VM of the set).

        Raises ValueError naming the id when it is not a scale set resource id.
        """
        match = _SCALE_SET_ID.match(resource_id or "")
        if match is None:
            raise ValueError(f"not a scale set resource id: {resource_id!r}")
        return cls(match["sub"], match["rg"], match["name"])

    @property
    def id(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachineScaleSets/{self.name}"
        )

    @property
    def key(self) -> str:
        """Case-insensitive identity, usable as a dictionary or Table key."""
        return self.id.lower()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScaleSetRef) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return self.id


def frozen_mapping(values: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(values or {}))


class RepairAction(StrEnum):
    """`automaticRepairsPolicy.repairAction` (Azure's default: Replace)."""

    REPLACE = "Replace"
    REIMAGE = "Reimage"
    RESTART = "Restart"


@dataclass(frozen=True, slots=True)
class AutomaticRepairs:
    """`properties.automaticRepairsPolicy` when enabled: the platform repairs VMs reporting
    unhealthy or unknown once `grace_period` has passed since their last state change."""

    grace_period: timedelta = timedelta(minutes=30)
    action: RepairAction = RepairAction.REPLACE

    @property
    def replaces_vms(self) -> bool:
        """Replace deletes the VM and creates a new one (new name and instance id) silently."""
        return self.action is RepairAction.REPLACE

    def describe(self) -> str:
        minutes = int(self.grace_period.total_seconds() // 60)
        return f"automaticRepairsPolicy {self.action.value} after a {minutes}-minute grace period"


@dataclass(frozen=True, slots=True)
class PriorityMix:
    """`priorityMixPolicy` of a Flexible scale set: a regular base, then a regular share.

    Azure picks the priority of each new VM so the set keeps this split as it scales out;
    the app cannot choose it. The documentation does not say how a fraction is rounded:
    the regular share is rounded up here (and in armsim), and a move never relies on the
    guess alone: each source deleted has the priority of the new VM that replaces it.
    """

    base_regular: int = 0
    regular_percent_above_base: int = 0

    def regular_target(self, count: int) -> int:
        """Regular VMs the split asks for in a set of `count` VMs."""
        above = max(0, count - self.base_regular)
        return min(count, self.base_regular) + ceil(above * self.regular_percent_above_base / 100)

    def next_spot(self, regular: int, spot: int, k: int) -> tuple[bool, ...]:
        """Whether each of the next `k` new VMs would be Spot, given the VMs there now."""
        upcoming: list[bool] = []
        for _ in range(k):
            is_spot = regular >= self.regular_target(regular + spot + 1)
            upcoming.append(is_spot)
            spot, regular = spot + int(is_spot), regular + int(not is_spot)
        return tuple(upcoming)

    def describe(self) -> str:
        return (
            f"priorityMixPolicy: baseRegularPriorityCount {self.base_regular}, "
            f"regularPriorityPercentageAboveBase {self.regular_percent_above_base}"
        )


@dataclass(frozen=True, slots=True)
class ScaleSet:
    """The parts of a scale set's model that the rebalancer reads."""

    ref: ScaleSetRef
    location: str
    zones: tuple[str, ...]
    sku_name: str | None
    capacity: int | None
    mode: OrchestrationMode
    provisioning_state: str
    health_monitoring: HealthMonitoring
    platform_rebalancing: bool
    """`resiliencyPolicy.automaticZoneRebalancingPolicy.enabled`: Azure balances it itself."""
    tags: Mapping[str, str] = field(default_factory=frozen_mapping)
    zone_balance: bool = False
    terminate_notification: timedelta | None = None
    """`scheduledEventsProfile.terminateNotificationProfile.notBeforeTimeout` when enabled."""
    etag: str | None = None
    """The model's ETag in this read: a write decided on it is sent with `If-Match`."""
    upgrade_mode: str = "Manual"
    """`upgradePolicy.mode`: Manual, Automatic or Rolling."""
    automatic_os_upgrade: bool = False
    """`upgradePolicy.automaticOSUpgradePolicy.enableAutomaticOSUpgrade`."""
    automatic_repairs: AutomaticRepairs | None = None
    """`automaticRepairsPolicy` when enabled, else None."""
    spot: bool = False
    """`virtualMachineProfile.priority` is Spot (or Low): new VMs use the lowPriorityCores
    quota, and Azure may evict them (`eviction_policy`) without an event."""
    eviction_policy: str | None = None
    """`virtualMachineProfile.evictionPolicy` of a Spot set: Deallocate or Delete."""
    priority_mix: PriorityMix | None = None
    """`priorityMixPolicy` (Flexible with Spot): new VMs are regular or Spot by the split."""
    vm_sizes: tuple[str, ...] = ()
    """Instance mix (`sku.name` "Mix"): the sizes of `skuProfile.vmSizes` Azure picks from."""

    @property
    def evicts_by_delete(self) -> bool:
        """Spot VMs of this set are deleted when evicted, which lowers the capacity as a
        delete does, and no event says so."""
        spot = self.spot or self.priority_mix is not None
        return spot and (self.eviction_policy or "").lower() == "delete"

    @property
    def instance_mix(self) -> bool:
        return bool(self.vm_sizes) or (self.sku_name or "").lower() == "mix"

    @property
    def can_roll(self) -> bool:
        """Rolling upgrades can run on it: Rolling mode, or automatic OS image upgrades."""
        return self.upgrade_mode.lower() == "rolling" or self.automatic_os_upgrade

    def tag(self, name: str) -> str | None:
        """Tag value by case-insensitive name (ARM tag names are case-insensitive)."""
        lowered = name.lower()
        for key, value in self.tags.items():
            if key.lower() == lowered:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Instance:
    """One VM of a scale set, as seen in one inventory read.

    `id` is what `delete_instances` takes: the instance id for Uniform, the VM name for
    Flexible.
    """

    id: str
    name: str
    zone: str | None
    provisioning_state: str
    power_state: PowerState
    health: Health
    protect_from_scale_in: bool = False
    protect_from_scale_set_actions: bool = False
    latest_model: bool = True
    created: datetime | None = None
    failure: str | None = None
    """The code of a failed provisioning (`ProvisioningState/failed/<code>`), if any."""
    protection_unknown: bool = False
    """Flexible only: this observation did not read the VM's protection (one GET per VM).
    Such a VM is never chosen as a source, nor taken for a protected one: every VM is read
    again right before it is deleted."""
    spot: bool = False
    """`priority` is Spot (or Low). A move deletes a source of its new VM's priority only."""
    in_standby_pool: bool = False
    """`instanceView.isVMInStandbyPool`: waiting in a standby pool, not serving in the set."""

    @property
    def protected(self) -> bool:
        return self.protect_from_scale_in or self.protect_from_scale_set_actions

    @property
    def deleting(self) -> bool:
        return self.provisioning_state.lower() == "deleting"

    @property
    def failed(self) -> bool:
        return self.provisioning_state.lower() == "failed"

    @property
    def deallocated(self) -> bool:
        return self.power_state in (PowerState.DEALLOCATED, PowerState.DEALLOCATING)

    @property
    def allocation_failed(self) -> bool:
        """Failed because Azure had no capacity for it: the VM never existed."""
        return self.failed and (self.failure or "").lower() in ALLOCATION_FAILURES

    @property
    def counts(self) -> bool:
        """Counts as capacity of its zone: active, deallocated, or created with failed
        extensions (Azure's zone balancing counts those too). VMs being deleted, VMs that
        never got capacity and VMs waiting in a standby pool do not."""
        return not (self.deleting or self.allocation_failed or self.in_standby_pool)

    @property
    def active(self) -> bool:
        """Provisioned and not deallocated or stopped."""
        return (
            self.provisioning_state.lower() == "succeeded"
            and self.power_state not in (PowerState.DEALLOCATED, PowerState.DEALLOCATING)
            and self.power_state not in (PowerState.STOPPED, PowerState.STOPPING)
        )

    @property
    def healthy(self) -> bool:
        return self.active and self.health is Health.HEALTHY

    @property
    def observed_unhealthy(self) -> bool:
        """Seen unhealthy (`HealthState/unhealthy`), not merely not seen healthy."""
        return self.health is Health.UNHEALTHY

    def sort_id(self) -> tuple[int, int | str]:
        """Numeric instance ids sort numerically, names lexically after them."""
        return (0, int(self.id)) if self.id.isdigit() else (1, self.id)


@dataclass(frozen=True, slots=True)
class RollingUpgrade:
    """The scale set's latest rolling upgrade (`rollingUpgrades/latest`)."""

    status: str
    """`runningStatus.code`: RollingForward, Cancelled, Completed or Faulted."""
    started: datetime | None = None
    pending: int = 0
    in_progress: int = 0

    @property
    def running(self) -> bool:
        return self.status.lower() == "rollingforward"


@dataclass(frozen=True, slots=True)
class Inventory:
    """A scale set and its VMs from one observation."""

    scale_set: ScaleSet
    instances: tuple[Instance, ...]
    observed_at: datetime

    def by_id(self) -> Mapping[str, Instance]:
        return {instance.id: instance for instance in self.instances}


class OutsideChange(StrEnum):
    """What someone else's event says they did to a scale set's size.

    The two look the same in an observation (fewer VMs, capacity lower by as many) but mean
    opposite things for the VMs an operation created: an absolute capacity counts them in, a
    delete of someone's VMs lowered what the owners keep, so they are surplus.
    """

    CAPACITY_WRITE = "capacity_write"
    VM_DELETE = "vm_delete"


@dataclass(frozen=True, slots=True)
class OutsideActivity:
    """The latest outside change of each kind that events reported for one scale set."""

    capacity_written_at: datetime | None = None
    vms_deleted_at: datetime | None = None

    def latest_since(self, since: datetime) -> OutsideChange | None:
        """The kind of the latest change reported after `since`, or None if none was."""
        seen = [
            (at, kind)
            for at, kind in (
                (self.capacity_written_at, OutsideChange.CAPACITY_WRITE),
                (self.vms_deleted_at, OutsideChange.VM_DELETE),
            )
            if at is not None and at >= since
        ]
        return max(seen)[1] if seen else None
