"""Token buckets shaped like ARM's and Compute's documented throttling policies.

Every request is charged to the buckets of its operation. The answers carry
`x-ms-ratelimit-remaining-subscription-{reads,writes,deletes}` and
`x-ms-ratelimit-remaining-resource: Microsoft.Compute/<Policy>;<remaining>,...`, in one of two
styles (`Throttle.style`, the scenario's `throttle_header_style`):

- `current` (the default), as Azure answered in the recordings kept in
  tests/data/real-azure/throttling (2024 and 2025): policy names carry a scope instead of a
  window (`GetVMScaleSetResource;32`, `HighCostGetVMScaleSetSubscriptionMaximum;1077`), and every
  scale set write also reports `VMScaleSetBatchedVMRequestsSubscriptionMaximum` and
  `VmssQueuedVMOperations;0`;
- `legacy`, the older style with a window in each name (`GetVMScaleSet3Min;197`).

Sizes and refill rates are those of "Compute throttling limits"
(https://learn.microsoft.com/azure/virtual-machines/compute-throttling-limits). When throttling is
enabled and a bucket is empty, the request is answered 429 with `Retry-After` (the seconds until
one token is back) and Compute's error body. Buckets refill on the simulator's clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from armsim.errors import ArmError, ErrorBody

HEADER_STYLES = ("current", "legacy")


@dataclass(frozen=True, slots=True)
class Policy:
    """`burst` tokens at most, refilled at `per_minute`; per subscription or per resource."""

    name: str
    burst: float
    per_minute: float
    per_resource: bool = False
    header: str = "resource"
    """`resource` (x-ms-ratelimit-remaining-resource) or `reads` / `writes` / `deletes`."""
    counter: bool = False
    """Reported but not a bucket: always `;0`, never throttles (`VmssQueuedVMOperations`)."""


ARM_READS = Policy("reads", 250, 25 * 60, header="reads")
ARM_WRITES = Policy("writes", 200, 10 * 60, header="writes")
ARM_DELETES = Policy("deletes", 200, 10 * 60, header="deletes")

# The legacy style: a window in every name.
VMSS_ACTIONS = Policy("Microsoft.Compute/VMScaleSetActions3Min", 12, 4, per_resource=True)
VMSS_LOW_COST_GET = Policy("Microsoft.Compute/GetVMScaleSet3Min", 36, 12, per_resource=True)
VMSS_HIGH_COST_GET = Policy(
    "Microsoft.Compute/HighCostGetVMScaleSet3Min", 30, 10, per_resource=True
)
VMSS_HIGH_COST_GET_SUB = Policy("Microsoft.Compute/HighCostGet30Min", 1080, 360)
VM_HIGH_COST_LIST = Policy("Microsoft.Compute/HighCostListVM3Min", 900, 300)


def _scoped(group: str, resource: tuple[float, float] | None, subscription: tuple[float, float]):
    """Today's pair of policies for one documented group: `<group>Resource` (per scale set)
    and `<group>SubscriptionMaximum`."""
    sub = Policy(f"Microsoft.Compute/{group}SubscriptionMaximum", *subscription)
    if resource is None:
        return None, sub
    return Policy(f"Microsoft.Compute/{group}Resource", *resource, per_resource=True), sub


# The current style, with the page's sizes (resource, subscription): (burst, refill per minute).
CREATE_VMSS, CREATE_VMSS_SUB = _scoped("CreateVMScaleSet", (12, 4), (375, 125))
VMSS_UPDATE, VMSS_UPDATE_SUB = _scoped("VMScaleSetActions", (12, 4), (1500, 500))
DELETE_VMSS, DELETE_VMSS_SUB = _scoped("DeleteVMScaleSet", (12, 4), (525, 175))
GET_VMSS, GET_VMSS_SUB = _scoped("GetVMScaleSet", (36, 12), (2400, 800))
HIGH_COST_GET_VMSS, HIGH_COST_GET_VMSS_SUB = _scoped("HighCostGetVMScaleSet", (30, 10), (1080, 360))
GET_OPERATION, GET_OPERATION_SUB = _scoped("GetOperation", (45, 15), (15000, 5000))
# Named like the others; no recording shows the VM list's header.
_, HIGH_COST_GET_VM_SUB = _scoped("HighCostGetVM", None, (900, 300))
# Recorded but not on the limits page: the recorded maximum, refilled in three minutes (the
# page's buckets all hold three minutes of refill).
BATCHED_VM_REQUESTS_SUB = Policy(
    "Microsoft.Compute/VMScaleSetBatchedVMRequestsSubscriptionMaximum", 6000, 2000
)
VMSS_VM_VIEWS_SUB = Policy("Microsoft.Compute/VMScaleSetVMViewsSubscriptionMaximum", 30000, 10000)
QUEUED_VM_OPERATIONS = Policy("Microsoft.Compute/VmssQueuedVMOperations", 0, 0, counter=True)

DEFAULT_POLICIES: Mapping[str, Policy] = {
    policy.name: policy
    for policy in (
        ARM_READS,
        ARM_WRITES,
        ARM_DELETES,
        VMSS_ACTIONS,
        VMSS_LOW_COST_GET,
        VMSS_HIGH_COST_GET,
        VMSS_HIGH_COST_GET_SUB,
        VM_HIGH_COST_LIST,
        CREATE_VMSS,
        CREATE_VMSS_SUB,
        VMSS_UPDATE,
        VMSS_UPDATE_SUB,
        DELETE_VMSS,
        DELETE_VMSS_SUB,
        GET_VMSS,
        GET_VMSS_SUB,
        HIGH_COST_GET_VMSS,
        HIGH_COST_GET_VMSS_SUB,
        GET_OPERATION,
        GET_OPERATION_SUB,
        HIGH_COST_GET_VM_SUB,
        BATCHED_VM_REQUESTS_SUB,
        VMSS_VM_VIEWS_SUB,
        QUEUED_VM_OPERATIONS,
    )
    if policy is not None
}

_READS_ONLY = (
    "vmss.rolling_upgrade_latest",
    "vmss_vm.get",
    "vmss_vm.get_instance_view",
    "vm.get",
    "vm.instance_view",
    "usage.list",
    "sku.list",
)
# Which policies each operation is charged to, per header style (by name; see DEFAULT_POLICIES).
LEGACY_CHARGES: Mapping[str, tuple[str, ...]] = {
    # Compute documents no bucket for listing scale sets: only ARM's reads.
    "vmss.list_all": ("reads",),
    "vmss.list": ("reads",),
    "vmss.get": ("reads", VMSS_LOW_COST_GET.name),
    "vmss.get_instance_view": ("reads", VMSS_HIGH_COST_GET.name, VMSS_HIGH_COST_GET_SUB.name),
    "vmss_vm.list": ("reads", VMSS_HIGH_COST_GET.name, VMSS_HIGH_COST_GET_SUB.name),
    **dict.fromkeys(_READS_ONLY, ("reads",)),
    "vm.list": ("reads", VM_HIGH_COST_LIST.name),
    "operation.status": ("reads",),
    "operation.result": ("reads",),
    "vmss.create_or_update": ("writes", VMSS_ACTIONS.name),
    "vmss.update": ("writes", VMSS_ACTIONS.name),
    "vmss.delete_instances": ("writes", VMSS_ACTIONS.name),
    "vmss.deallocate": ("writes", VMSS_ACTIONS.name),
    "vmss.delete": ("deletes", VMSS_ACTIONS.name),
    "vmss_vm.update": ("writes",),
    "vmss_vm.deallocate": ("writes",),
    "vmss_vm.delete": ("deletes",),
    "vm.deallocate": ("writes",),
    "vm.delete": ("deletes",),
}
_WRITE_COUNTERS = (BATCHED_VM_REQUESTS_SUB.name, QUEUED_VM_OPERATIONS.name)
CURRENT_CHARGES: Mapping[str, tuple[str, ...]] = {
    **LEGACY_CHARGES,
    # In the order the recordings list them.
    "vmss.get": ("reads", GET_VMSS_SUB.name, GET_VMSS.name),
    "vmss.get_instance_view": ("reads", HIGH_COST_GET_VMSS_SUB.name, HIGH_COST_GET_VMSS.name),
    "vmss_vm.list": (
        "reads",
        HIGH_COST_GET_VMSS_SUB.name,
        HIGH_COST_GET_VMSS.name,
        VMSS_VM_VIEWS_SUB.name,
    ),
    "vm.list": ("reads", HIGH_COST_GET_VM_SUB.name),
    "operation.status": ("reads", GET_OPERATION.name, GET_OPERATION_SUB.name),
    "operation.result": ("reads", GET_OPERATION.name, GET_OPERATION_SUB.name),
    "vmss.create_or_update": ("writes", CREATE_VMSS_SUB.name, CREATE_VMSS.name, *_WRITE_COUNTERS),
    "vmss.update": ("writes", VMSS_UPDATE_SUB.name, VMSS_UPDATE.name, *_WRITE_COUNTERS),
    # Deleting instances is not on the limits page: charged like an update, as before.
    "vmss.delete_instances": ("writes", VMSS_UPDATE_SUB.name, VMSS_UPDATE.name, *_WRITE_COUNTERS),
    "vmss.deallocate": ("writes", DELETE_VMSS_SUB.name, *_WRITE_COUNTERS),
    "vmss.delete": ("deletes", DELETE_VMSS_SUB.name, DELETE_VMSS.name, QUEUED_VM_OPERATIONS.name),
}
CHARGES_BY_STYLE: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "current": CURRENT_CHARGES,
    "legacy": LEGACY_CHARGES,
}
CHARGES = CURRENT_CHARGES


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: datetime


@dataclass
class Throttle:
    enabled: bool = False
    style: str = "current"
    """Header style: `current` (Azure's answers today) or `legacy` (windows in the names)."""
    policies: Mapping[str, Policy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    _buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.style not in HEADER_STYLES:
            raise ValueError(
                f"throttle header style must be one of {HEADER_STYLES}, got {self.style!r}"
            )

    def charge(
        self, operation: str, subscription: str, resource: str, now: datetime
    ) -> tuple[dict[str, str], tuple[str, ...]]:
        """Take one token from each bucket of `operation`.

        Returns (response headers, names of the policies charged). Raises a 429 ArmError when
        enabled and a bucket is empty (nothing is taken then).
        """
        charges = CHARGES_BY_STYLE[self.style].get(operation, ())
        names = tuple(name for name in charges if name in self.policies)
        if not self.enabled:
            return self._headers_at_max(names), names
        buckets = []
        for name in names:
            policy = self.policies[name]
            if policy.counter:
                buckets.append((policy, None))
                continue
            scope = resource.lower() if policy.per_resource else subscription.lower()
            bucket = self._refilled(policy, scope, now)
            buckets.append((policy, bucket))
        for policy, bucket in buckets:
            if bucket is not None and bucket.tokens < 1.0:
                raise self._too_many(policy, bucket, now)
        headers: dict[str, str] = {}
        resource_parts: list[str] = []
        for policy, bucket in buckets:
            if bucket is None:
                resource_parts.append(f"{policy.name};0")
                continue
            bucket.tokens -= 1.0
            remaining = int(bucket.tokens)
            if policy.header == "resource":
                resource_parts.append(f"{policy.name};{remaining}")
            else:
                headers[f"x-ms-ratelimit-remaining-subscription-{policy.header}"] = str(remaining)
        if resource_parts:
            headers["x-ms-ratelimit-remaining-resource"] = ",".join(resource_parts)
        return headers, names

    def _headers_at_max(self, names: tuple[str, ...]) -> dict[str, str]:
        headers: dict[str, str] = {}
        resource_parts = []
        for name in names:
            policy = self.policies[name]
            remaining = max(0, int(policy.burst) - 1)
            if policy.header == "resource":
                resource_parts.append(f"{policy.name};{remaining}")
            else:
                headers[f"x-ms-ratelimit-remaining-subscription-{policy.header}"] = str(remaining)
        if resource_parts:
            headers["x-ms-ratelimit-remaining-resource"] = ",".join(resource_parts)
        return headers

    def _refilled(self, policy: Policy, scope: str, now: datetime) -> _Bucket:
        key = (policy.name, scope)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(policy.burst, now)
            self._buckets[key] = bucket
            return bucket
        elapsed = (now - bucket.updated).total_seconds()
        if elapsed > 0:
            bucket.tokens = min(policy.burst, bucket.tokens + elapsed * policy.per_minute / 60.0)
            bucket.updated = now
        return bucket

    @staticmethod
    def _too_many(policy: Policy, bucket: _Bucket, now: datetime) -> ArmError:
        wait = max(1, math.ceil((1.0 - bucket.tokens) * 60.0 / policy.per_minute))
        short = policy.name.rsplit("/", 1)[-1]
        headers = {"Retry-After": str(wait)}
        if policy.header == "resource":
            headers["x-ms-ratelimit-remaining-resource"] = f"{policy.name};0"
            return ArmError(
                429,
                "OperationNotAllowed",
                "The server rejected the request because too many requests have been received "
                "for this subscription.",
                details=(
                    ErrorBody(
                        "TooManyRequests",
                        f'{{"operationGroup":"{short}","startTime":"{now.isoformat()}",'
                        f'"endTime":"{now.isoformat()}","allowedRequestCount":'
                        f'{int(policy.burst)},"measuredRequestCount":{int(policy.burst) + 1}}}',
                        short,
                    ),
                ),
                headers=headers,
            )
        headers[f"x-ms-ratelimit-remaining-subscription-{policy.header}"] = "0"
        return ArmError(
            429,
            "SubscriptionRequestsThrottled",
            f"Number of '{policy.header}' requests for subscription exceeded the limit of "
            f"'{int(policy.burst)}' for time interval. Please try again after '{wait}' seconds.",
            headers=headers,
        )


def throttle_error_for_fault(retry_after: int, target: str = "HighCostGet30Min") -> ArmError:
    """A 429 as Compute answers it, for the `throttle` fault."""
    return ArmError(
        429,
        "OperationNotAllowed",
        "The server rejected the request because too many requests have been received for this "
        "subscription.",
        details=(
            ErrorBody(
                "TooManyRequests",
                f'{{"operationGroup":"{target}","allowedRequestCount":1,"measuredRequestCount":2}}',
                target,
            ),
        ),
        headers={
            "Retry-After": str(retry_after),
            "x-ms-ratelimit-remaining-resource": f"Microsoft.Compute/{target};0",
        },
    )
