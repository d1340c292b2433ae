"""Token buckets shaped like ARM's and Compute's documented throttling policies.

Every request is charged to the buckets of its operation. The answers carry
`x-ms-ratelimit-remaining-subscription-{reads,writes,deletes}` and
`x-ms-ratelimit-remaining-resource: Microsoft.Compute/<Policy>;<remaining>,...`. When throttling
is enabled and a bucket is empty, the request is answered 429 with `Retry-After` (the seconds
until one token is back) and Compute's error body. Buckets refill on the simulator's clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from armsim.errors import ArmError, ErrorBody


@dataclass(frozen=True, slots=True)
class Policy:
    """`burst` tokens at most, refilled at `per_minute`; per subscription or per resource."""

    name: str
    burst: float
    per_minute: float
    per_resource: bool = False
    header: str = "resource"
    """`resource` (x-ms-ratelimit-remaining-resource) or `reads` / `writes` / `deletes`."""


ARM_READS = Policy("reads", 250, 25 * 60, header="reads")
ARM_WRITES = Policy("writes", 200, 10 * 60, header="writes")
ARM_DELETES = Policy("deletes", 200, 10 * 60, header="deletes")
VMSS_ACTIONS = Policy("Microsoft.Compute/VMScaleSetActions3Min", 12, 4, per_resource=True)
VMSS_LOW_COST_GET = Policy("Microsoft.Compute/GetVMScaleSet3Min", 36, 12, per_resource=True)
VMSS_HIGH_COST_GET = Policy(
    "Microsoft.Compute/HighCostGetVMScaleSet3Min", 30, 10, per_resource=True
)
VMSS_HIGH_COST_GET_SUB = Policy("Microsoft.Compute/HighCostGet30Min", 1080, 360)
VM_HIGH_COST_LIST = Policy("Microsoft.Compute/HighCostListVM3Min", 900, 300)

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
    )
}

# Which policies each operation is charged to (by name; see DEFAULT_POLICIES).
CHARGES: Mapping[str, tuple[str, ...]] = {
    # Compute documents no bucket for listing scale sets: only ARM's reads.
    "vmss.list_all": ("reads",),
    "vmss.list": ("reads",),
    "vmss.get": ("reads", VMSS_LOW_COST_GET.name),
    "vmss.get_instance_view": ("reads", VMSS_HIGH_COST_GET.name, VMSS_HIGH_COST_GET_SUB.name),
    "vmss_vm.list": ("reads", VMSS_HIGH_COST_GET.name, VMSS_HIGH_COST_GET_SUB.name),
    "vmss_vm.get": ("reads",),
    "vmss_vm.get_instance_view": ("reads",),
    "vm.list": ("reads", VM_HIGH_COST_LIST.name),
    "vm.get": ("reads",),
    "vm.instance_view": ("reads",),
    "usage.list": ("reads",),
    "sku.list": ("reads",),
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


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: datetime


@dataclass
class Throttle:
    enabled: bool = False
    policies: Mapping[str, Policy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    _buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)

    def charge(
        self, operation: str, subscription: str, resource: str, now: datetime
    ) -> tuple[dict[str, str], tuple[str, ...]]:
        """Take one token from each bucket of `operation`.

        Returns (response headers, names of the policies charged). Raises a 429 ArmError when
        enabled and a bucket is empty (nothing is taken then).
        """
        names = tuple(name for name in CHARGES.get(operation, ()) if name in self.policies)
        if not self.enabled:
            return self._headers_at_max(names), names
        buckets = []
        for name in names:
            policy = self.policies[name]
            scope = resource.lower() if policy.per_resource else subscription.lower()
            bucket = self._refilled(policy, scope, now)
            buckets.append((policy, bucket))
        for policy, bucket in buckets:
            if bucket.tokens < 1.0:
                raise self._too_many(policy, bucket, now)
        headers: dict[str, str] = {}
        resource_parts: list[str] = []
        for policy, bucket in buckets:
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
            remaining = int(policy.burst) - 1
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
