"""Client-side throttling budget for Azure Compute calls (pure: no I/O, the clock is passed in).

Azure throttles per subscription and per resource with token buckets (ARM: reads, writes,
deletes; Compute: per-API policies such as the scale-set VM list "high-cost get"). The rebalancer
shares those buckets with the user's own tools, so it keeps to a *share* (default 20%) of each:
a bucket here has `share` times Azure's burst size and refill rate. Three signals slow it down:

1. its own buckets (it never plans to spend more than its share);
2. `x-ms-ratelimit-remaining-resource` headers: when Azure reports that a policy has less left
   than the app's own share of it (at most the part left for others), the call kind is held
   until that policy has refilled to that line (so other tools' use of the rest never stops
   the app; a real shortage does). Both header styles Azure has used are understood;
3. a 429's `Retry-After`: the call kind is held for that long.

`Budget.reserve` never sleeps: it books a slot and says how long the caller must wait for it, so
that concurrent callers queue fairly. The caller (the HTTP pipeline policy in `compute`) sleeps,
or gives up when the wait is longer than an invocation can afford.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

DEFAULT_SHARE = 0.2
REMAINING_RESOURCE = "x-ms-ratelimit-remaining-resource"
REMAINING_SUBSCRIPTION = "x-ms-ratelimit-remaining-subscription"


class CallKind(StrEnum):
    """What an ARM request does, as far as throttling is concerned."""

    SCALE_SET_LIST = "scaleSetList"
    SCALE_SET_GET = "scaleSetGet"
    SCALE_SET_VM_LIST = "scaleSetVmList"
    VM_LIST = "vmList"
    SCALE_SET_UPDATE = "scaleSetUpdate"
    SCALE_SET_DELETE_INSTANCES = "scaleSetDeleteInstances"
    OPERATION_STATUS = "operationStatus"
    USAGE_LIST = "usageList"
    SKU_LIST = "skuList"
    OTHER_READ = "otherRead"
    OTHER_WRITE = "otherWrite"
    OTHER_DELETE = "otherDelete"


class Scope(StrEnum):
    SUBSCRIPTION = "subscription"
    RESOURCE = "resource"


@dataclass(frozen=True, slots=True)
class Policy:
    """One of Azure's token buckets: `burst` tokens at most, refilled at `per_minute`."""

    name: str
    burst: float
    per_minute: float
    scope: Scope = Scope.SUBSCRIPTION


# ARM's per-subscription-and-principal buckets (per second in the docs, here per minute).
ARM_READS = Policy("arm/reads", 250, 25 * 60)
ARM_WRITES = Policy("arm/writes", 200, 10 * 60)
ARM_DELETES = Policy("arm/deletes", 200, 10 * 60)
# Compute's documented policies (refill per minute / max).
VMSS_UPDATE = Policy("compute/vmssUpdate", 12, 4, Scope.RESOURCE)
VMSS_HIGH_COST_GET = Policy("compute/vmssHighCostGet", 30, 10, Scope.RESOURCE)
VMSS_HIGH_COST_GET_SUB = Policy("compute/vmssHighCostGetSubscription", 1080, 360)
VMSS_LOW_COST_GET = Policy("compute/vmssLowCostGet", 36, 12, Scope.RESOURCE)
VM_HIGH_COST_LIST = Policy("compute/vmHighCostList", 900, 300)

COMPUTE_POLICIES: Mapping[CallKind, tuple[Policy, ...]] = {
    CallKind.SCALE_SET_LIST: (ARM_READS, VMSS_HIGH_COST_GET_SUB),
    CallKind.SCALE_SET_GET: (ARM_READS, VMSS_LOW_COST_GET),
    CallKind.SCALE_SET_VM_LIST: (ARM_READS, VMSS_HIGH_COST_GET, VMSS_HIGH_COST_GET_SUB),
    CallKind.VM_LIST: (ARM_READS, VM_HIGH_COST_LIST),
    CallKind.SCALE_SET_UPDATE: (ARM_WRITES, VMSS_UPDATE),
    CallKind.SCALE_SET_DELETE_INSTANCES: (ARM_WRITES, VMSS_UPDATE),
    CallKind.OPERATION_STATUS: (ARM_READS,),
    CallKind.USAGE_LIST: (ARM_READS,),
    CallKind.SKU_LIST: (ARM_READS,),
    CallKind.OTHER_READ: (ARM_READS,),
    CallKind.OTHER_WRITE: (ARM_WRITES,),
    CallKind.OTHER_DELETE: (ARM_DELETES,),
}

_HEADER_ENTRY = re.compile(r"^\s*(?P<name>[^;,]+?)\s*;\s*(?P<remaining>-?\d+)\s*$")
_WINDOW = re.compile(r"(?P<count>\d+)\s*(?P<unit>Min|Sec|Hour)s?$", re.IGNORECASE)
_UNIT_SECONDS = {"min": 60.0, "sec": 1.0, "hour": 3600.0}
_SCOPED = re.compile(r"^(?P<group>\w+?)(?P<scope>Resource|SubscriptionMaximum)$")

# Compute's documented limits for the policy names Azure reports today, which carry no window
# (`Microsoft.Compute/GetVMScaleSetResource;32`): "Compute throttling limits",
# https://learn.microsoft.com/azure/virtual-machines/compute-throttling-limits
# group -> ((resource burst, refill per minute), (subscription burst, refill per minute)).
DOCUMENTED_LIMITS: Mapping[str, tuple[tuple[float, float] | None, tuple[float, float]]] = {
    "CreateVMScaleSet": ((12, 4), (375, 125)),  # Put VMSS
    "VMScaleSetActions": ((12, 4), (1500, 500)),  # Update VMSS (and its actions)
    "DeleteVMScaleSet": ((12, 4), (525, 175)),  # Delete VMSS, power off, deallocate
    "GetVMScaleSet": ((36, 12), (2400, 800)),  # Low Cost Get VMSS
    "HighCostGetVMScaleSet": ((30, 10), (1080, 360)),  # High Cost Get VMSS: instance view, lists
    "HighCostGetVM": (None, (900, 300)),  # High Cost Get VM: VM lists (subscription only)
    "GetOperation": ((45, 15), (15000, 5000)),  # status of asynchronous operations
}
# Every bucket on that page holds three minutes of refill (maximum = 3 x refill per minute):
# the refill window assumed for a reported policy whose limits are not on the page.
DEFAULT_WINDOW_SECONDS = 180.0
# Counters in the header that are not token buckets. `VmssQueuedVMOperations` is 0 on every
# write in the recordings (tests/data/real-azure/throttling/) while the next writes were
# accepted seconds later: it counts queued VM operations, it is not calls left.
NOT_BUDGETS = frozenset({"VmssQueuedVMOperations"})


def parse_remaining_header(value: str | None) -> dict[str, int]:
    """`"Microsoft.Compute/GetVMScaleSet3Min;197,Microsoft.Compute/GetVMScaleSet30Min;1297"`
    -> `{"Microsoft.Compute/GetVMScaleSet3Min": 197, ...}`; malformed entries are ignored."""
    result: dict[str, int] = {}
    for part in (value or "").split(","):
        match = _HEADER_ENTRY.match(part)
        if match:
            result[match["name"]] = int(match["remaining"])
    return result


def policy_window_seconds(name: str) -> float | None:
    """The refill window a Compute policy name ends with (`...3Min` -> 180), if any."""
    match = _WINDOW.search(name)
    if match is None:
        return None
    return int(match["count"]) * _UNIT_SECONDS[match["unit"].lower()]


@dataclass(frozen=True, slots=True)
class ReportedPolicy:
    """What a policy name in `x-ms-ratelimit-remaining-resource` says about its bucket."""

    name: str
    budget: bool
    """False for counters that are not calls left (they never hold a call)."""
    per_resource: bool
    burst: float | None
    """Azure's documented bucket size, when the name is on the limits page."""
    window: float
    """Seconds an empty bucket takes to refill completely."""


def reported_policy(name: str) -> ReportedPolicy:
    """Read a policy name of either header style.

    Older answers name a window (`GetVMScaleSet3Min`, `HighCostGet30Min`): the bucket refills
    in that window. Today's name a scope instead (`GetVMScaleSetResource`,
    `HighCostGetVMScaleSetSubscriptionMaximum`): limits and refill come from
    `DOCUMENTED_LIMITS`, or, for a group not on the page, a refill window of three minutes.
    """
    short = name.rsplit("/", 1)[-1]
    if short in NOT_BUDGETS:
        return ReportedPolicy(name, False, False, None, DEFAULT_WINDOW_SECONDS)
    window = policy_window_seconds(short)
    if window is not None:
        return ReportedPolicy(name, True, False, None, window)
    scoped = _SCOPED.match(short)
    if scoped is None:
        return ReportedPolicy(name, True, False, None, DEFAULT_WINDOW_SECONDS)
    per_resource = scoped["scope"] == "Resource"
    limits = DOCUMENTED_LIMITS.get(scoped["group"])
    limit = None if limits is None else limits[0] if per_resource else limits[1]
    if limit is None:
        return ReportedPolicy(name, True, per_resource, None, DEFAULT_WINDOW_SECONDS)
    burst, per_minute = limit
    return ReportedPolicy(name, True, per_resource, burst, 60.0 * burst / per_minute)


@dataclass(slots=True)
class _Bucket:
    """A token bucket that may go into debt: a negative level is a queue of booked slots."""

    burst: float
    per_second: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.burst, self.level + (now - self.updated) * self.per_second)
            self.updated = now

    def wait_for(self, cost: float) -> float:
        missing = cost - self.level
        return 0.0 if missing <= 0 else missing / self.per_second


@dataclass(slots=True)
class _Observed:
    highest: float
    window: float


@dataclass(frozen=True, slots=True)
class Reservation:
    """A booked slot: start the call after `wait` seconds. `granted` is False when the wait was
    longer than the caller could afford; then nothing was booked."""

    kind: CallKind
    wait: float
    granted: bool


@dataclass
class Budget:
    """Token buckets for one subscription, at `share` of Azure's limits. Thread-safe."""

    share: float = DEFAULT_SHARE
    policies: Mapping[CallKind, tuple[Policy, ...]] = field(
        default_factory=lambda: dict(COMPUTE_POLICIES)
    )

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ValueError(f"budget share must be in (0, 1], got {self.share}")
        self._lock = threading.Lock()
        # The app's share, but never more than what is left for others: with the whole of
        # a (private) bucket to itself, only a 429's Retry-After holds the app.
        self._pause_line = min(self.share, 1.0 - self.share)
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._holds: dict[tuple[CallKind, str], float] = {}
        """Hold ends by call kind and scale set ('' for every scale set)."""
        self._observed: dict[str, _Observed] = {}

    def _bucket(self, policy: Policy, resource: str | None, now: float) -> _Bucket:
        scope_key = (resource or "").lower() if policy.scope is Scope.RESOURCE else ""
        key = (policy.name, scope_key)
        bucket = self._buckets.get(key)
        if bucket is None:
            burst = max(1.0, policy.burst * self.share)
            bucket = _Bucket(burst, policy.per_minute * self.share / 60.0, burst, now)
            self._buckets[key] = bucket
        bucket.refill(now)
        return bucket

    def reserve(
        self,
        kind: CallKind,
        now: float,
        *,
        resource: str | None = None,
        max_wait: float | None = None,
    ) -> Reservation:
        """Book one call of `kind` (on `resource`, a scale set id, for per-resource policies).

        Returns how long to wait before sending. When that is more than `max_wait`, nothing is
        booked and the reservation is not granted: the caller reports `throttled` instead.
        """
        with self._lock:
            buckets = [self._bucket(p, resource, now) for p in self.policies.get(kind, ())]
            holds = [self._holds.get((kind, ""), now), self._holds.get((kind, _key(resource)), now)]
            wait = max([b.wait_for(1.0) for b in buckets] + [h - now for h in holds] + [0.0])
            if max_wait is not None and wait > max_wait:
                return Reservation(kind, wait, granted=False)
            for bucket in buckets:
                bucket.level -= 1.0
            return Reservation(kind, wait, granted=True)

    def hold(self, kind: CallKind, until: float, *, resource: str | None = None) -> None:
        """Let no call of `kind` (on `resource`, or on any scale set) start before `until`
        (a 429's Retry-After, a low header)."""
        key = (kind, _key(resource))
        with self._lock:
            self._holds[key] = max(self._holds.get(key, until), until)

    def observe(
        self,
        kind: CallKind,
        remaining: Mapping[str, int],
        now: float,
        windows: Mapping[str, float] | None = None,
        *,
        resource: str | None = None,
    ) -> float | None:
        """Take Azure's remaining-calls report for a call of `kind` (on `resource`).

        A policy's size is Azure's documented one where the name is on the limits page, else
        the highest value seen so far. When a policy reports fewer calls left than the app's
        share of it (at most the part left for others), calls of this kind are held until the
        policy has refilled to that line:
        on that scale set for a per-scale-set policy, else on all. What other tools use above
        the app's share never holds it. Returns the hold end, if any.
        """
        hold_until: float | None = None
        everywhere = resource is None
        with self._lock:
            for name, left in remaining.items():
                policy = reported_policy(name)
                if not policy.budget:
                    continue
                window = (windows or {}).get(name) or policy.window
                seen = self._observed.get(name)
                if seen is None:
                    seen = self._observed[name] = _Observed(max(left, 1), window)
                seen.highest = max(seen.highest, left, policy.burst or 0)
                floor = self._pause_line * seen.highest
                if left >= floor:
                    continue
                until = now + (floor - left) / (seen.highest / seen.window)
                hold_until = until if hold_until is None else max(hold_until, until)
                everywhere = everywhere or not policy.per_resource
        if hold_until is not None:
            self.hold(kind, hold_until, resource=None if everywhere else resource)
        return hold_until

    def observe_headers(
        self,
        kind: CallKind,
        headers: Mapping[str, str],
        now: float,
        *,
        resource: str | None = None,
    ) -> float | None:
        """Observe a response's `x-ms-ratelimit-remaining-*` headers (case-insensitive map)."""
        remaining = parse_remaining_header(headers.get(REMAINING_RESOURCE))
        windows: dict[str, float] = {}
        arm = (("reads", ARM_READS), ("writes", ARM_WRITES), ("deletes", ARM_DELETES))
        for verb, policy in arm:
            value = headers.get(f"{REMAINING_SUBSCRIPTION}-{verb}")
            if value and value.strip().lstrip("-").isdigit():
                remaining[policy.name] = int(value)
                windows[policy.name] = 60.0 * policy.burst / policy.per_minute
        return self.observe(kind, remaining, now, windows, resource=resource)


def _key(resource: str | None) -> str:
    return (resource or "").lower()
