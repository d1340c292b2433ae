"""Fault injection: rules that make matching requests, operations, placements or VMs misbehave.

A rule matches by operation name (see `OPERATIONS`), an optional case-insensitive substring of
the request path (`target`), an optional caller object id (`principal`) and, for placement and
health faults, a zone. It fires `count` times (None: without limit) with `probability`, drawn
from the simulator's seeded random generator so runs repeat.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field, replace

# Request-level kinds answer the HTTP request instead of the simulator.
REQUEST_KINDS = frozenset(
    {
        "throttle",  # 429 with Retry-After
        "error",  # any status + code (500, 503, ...)
        "reset",  # the connection is reset without an answer
        "slow",  # the answer is delayed by `delay` real seconds, then served normally
        "quota",  # 409 OperationNotAllowed: exceeding approved cores quota
        "sku_not_available",  # 409 SkuNotAvailable
        "linked_authorization_failed",  # 403 LinkedAuthorizationFailed
        "conflict",  # 409 Conflict / OperationNotAllowed: another operation in progress
        "not_found",  # 404 ResourceNotFound
    }
)
# Operation-level kinds let the request be accepted, then end its long-running operation badly.
OPERATION_KINDS = frozenset({"preempt", "operation_failure"})
# Placement and VM life kinds.
PLACEMENT_KINDS = frozenset({"allocation_failure"})
HEALTH_KINDS = frozenset({"never_healthy", "unhealthy", "provisioning_failure"})
KINDS = REQUEST_KINDS | OPERATION_KINDS | PLACEMENT_KINDS | HEALTH_KINDS

OPERATIONS = frozenset(
    {
        "*",
        "vmss.list_all",
        "vmss.list",
        "vmss.get",
        "vmss.create_or_update",
        "vmss.update",
        "vmss.delete",
        "vmss.delete_instances",
        "vmss.get_instance_view",
        "vmss.rolling_upgrade_latest",
        "vmss.deallocate",
        "vmss_vm.list",
        "vmss_vm.get",
        "vmss_vm.get_instance_view",
        "vmss_vm.update",
        "vmss_vm.delete",
        "vmss_vm.deallocate",
        "vm.list",
        "vm.get",
        "vm.instance_view",
        "vm.delete",
        "vm.deallocate",
        "usage.list",
        "sku.list",
        "operation.status",
        "operation.result",
        "placement",
        "vm.provision",
    }
)


@dataclass(frozen=True, slots=True)
class FaultRule:
    """One fault. Examples:

    - `FaultRule("throttle", operation="vmss_vm.list", retry_after=30, count=2)`
    - `FaultRule("error", operation="vmss.update", status=503, code="ServiceUnavailable")`
    - `FaultRule("allocation_failure", zone="1", count=None)`: zone 1 has no room
    - `FaultRule("never_healthy", target="/web", count=None)`: new VMs of `web` stay initializing
    """

    kind: str
    operation: str = "*"
    target: str = ""
    count: int | None = 1
    probability: float = 1.0
    status: int | None = None
    code: str | None = None
    message: str | None = None
    retry_after: int | None = None
    """Seconds in `Retry-After`: a throttle sends 10 unless told; an error only when set."""
    delay: float = 0.0
    zone: str | None = None
    principal: str | None = None
    after: int = 0
    """Let this many matches pass before the rule starts firing."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {sorted(KINDS)}")
        if self.operation not in OPERATIONS:
            raise ValueError(
                f"unknown fault operation {self.operation!r}; use one of {sorted(OPERATIONS)}"
            )
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"fault probability must be in [0, 1], got {self.probability}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"fault count must be >= 0 or None, got {self.count}")


@dataclass(slots=True)
class _Armed:
    rule: FaultRule
    remaining: int | None
    skipped: int = 0
    fired: int = 0


@dataclass(frozen=True, slots=True)
class FiredFault:
    rule: FaultRule
    index: int


@dataclass
class Faults:
    """The active rules of one simulator. `add` returns the rule's handle (its index)."""

    seed: int = 0
    _rules: list[_Armed] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _random: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def add(self, rule: FaultRule | None = None, /, **kwargs: object) -> int:
        """Add a rule (a FaultRule, or its fields as keywords). Returns its handle."""
        if rule is None:
            rule = FaultRule(**kwargs)  # type: ignore[arg-type]
        elif kwargs:
            rule = replace(rule, **kwargs)  # type: ignore[arg-type]
        with self._lock:
            self._rules.append(_Armed(rule, rule.count))
            return len(self._rules) - 1

    def remove(self, handle: int) -> None:
        with self._lock:
            self._rules[handle].remaining = 0

    def clear(self) -> None:
        with self._lock:
            for armed in self._rules:
                armed.remaining = 0

    def fired(self, handle: int) -> int:
        """How many times the rule has fired so far."""
        with self._lock:
            return self._rules[handle].fired

    def match(
        self,
        kinds: frozenset[str],
        operation: str,
        path: str = "",
        principal: str | None = None,
        zone: str | None = None,
    ) -> FiredFault | None:
        """The first armed rule of `kinds` that fires for this event, consuming one use."""
        lowered = path.lower()
        with self._lock:
            for index, armed in enumerate(self._rules):
                rule = armed.rule
                if rule.kind not in kinds or armed.remaining == 0:
                    continue
                if rule.operation not in ("*", operation):
                    continue
                if rule.target and rule.target.lower() not in lowered:
                    continue
                if rule.principal and (principal or "").lower() != rule.principal.lower():
                    continue
                if rule.zone is not None and zone != rule.zone:
                    continue
                if armed.skipped < rule.after:
                    armed.skipped += 1
                    continue
                if rule.probability < 1.0 and self._random.random() >= rule.probability:
                    continue
                if armed.remaining is not None:
                    armed.remaining -= 1
                armed.fired += 1
                return FiredFault(rule, index)
        return None
