"""Client-side throttling budget for Azure Compute calls (pure: no I/O, the clock is passed in).

Azure throttles per subscription and per resource with token buckets (ARM: reads, writes,
deletes; Compute: per-API policies such as the scale-set VM list "high-cost get"). The rebalancer
shares those buckets with the user's own tools, so it keeps to a *share* (default 20%) of each:
a bucket here has `share` times Azure's burst size and refill rate. Three signals slow it down:

1. its own buckets (it never plans to spend more than its share);
2. `x-ms-ratelimit-remaining-resource` headers: when Azure reports that a policy has less left
   than the part reserved for others, the call kind is held until that policy has refilled;
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
    highest: int
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
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._holds: dict[CallKind, float] = {}
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
            wait = max([b.wait_for(1.0) for b in buckets] + [self._holds.get(kind, now) - now, 0.0])
            if max_wait is not None and wait > max_wait:
                return Reservation(kind, wait, granted=False)
            for bucket in buckets:
                bucket.level -= 1.0
            return Reservation(kind, wait, granted=True)

    def hold(self, kind: CallKind, until: float) -> None:
        """Let no call of `kind` start before `until` (a 429's Retry-After, a low header)."""
        with self._lock:
            self._holds[kind] = max(self._holds.get(kind, until), until)

    def observe(
        self,
        kind: CallKind,
        remaining: Mapping[str, int],
        now: float,
        windows: Mapping[str, float] | None = None,
    ) -> float | None:
        """Take Azure's remaining-calls report for a call of `kind`.

        Azure's own burst size is not in the header; the highest value seen so far stands in for
        it. When a policy reports fewer calls left than the part of it reserved for others, the
        kind is held until the policy has refilled above that line. Returns the hold end, if any.
        """
        hold_until: float | None = None
        with self._lock:
            for name, left in remaining.items():
                window = (windows or {}).get(name) or policy_window_seconds(name)
                seen = self._observed.get(name)
                if seen is None:
                    seen = self._observed[name] = _Observed(max(left, 1), window or 60.0)
                seen.highest = max(seen.highest, left)
                reserved = (1.0 - self.share) * seen.highest
                if left >= reserved:
                    continue
                refill_per_second = seen.highest / seen.window
                until = now + (reserved - left) / refill_per_second
                hold_until = until if hold_until is None else max(hold_until, until)
        if hold_until is not None:
            self.hold(kind, hold_until)
        return hold_until

    def observe_headers(
        self, kind: CallKind, headers: Mapping[str, str], now: float
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
        return self.observe(kind, remaining, now, windows)
