"""The app's own long-running writes: when to look at them, and what their outcome tells.

Pure. The shell keeps one `PendingCall` per operation (the last capacity or delete write it
sent), polls its status only once `next_poll_at` has passed (Azure's `Retry-After`; no
invocation ever waits), and hands the outcome to the operation as evidence: a failed VM of a
capacity write carries the code Azure gave for it in the write's `error`, so an allocation
failure backs its zone off and an extension failure is a failed replacement, however little
the VM list says about it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from rebalancer.model import Inventory

if TYPE_CHECKING:
    from rebalancer.operation import OperationRecord

SET_CAPACITY = "set_capacity"
DELETE_INSTANCES = "delete_instances"


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """How a write's long-running operation ended."""

    status: str
    """`Succeeded`, `Failed`, `Canceled` or `Unknown`."""
    code: str | None = None
    message: str = ""
    failed_instances: Mapping[str, str] = field(default_factory=dict)
    """Instance id (Flexible: VM name) -> code, from the `error.details` naming a `target`."""

    @property
    def failed(self) -> bool:
        """Ended `Failed` or `Canceled` (`Unknown`: the status was no longer available)."""
        return self.status.lower() in ("failed", "canceled")

    def describe(self) -> str:
        text = f"ended {self.status}"
        if self.code:
            text += f" with {self.code}"
        named = ", ".join(f"{vm}: {code}" for vm, code in sorted(self.failed_instances.items()))
        if named:
            text += f" ({named})"
        return f"{text}: {self.message}" if self.message else text


@dataclass(frozen=True, slots=True)
class PendingCall:
    """The last write an operation sent, as the shell stores it beside the operation."""

    action: str
    """`set_capacity` or `delete_instances`."""
    call: Mapping[str, Any]
    """The adapter's record of the accepted write (status URLs, request ids)."""
    sent_at: datetime
    next_poll_at: datetime | None = None
    """Not polled before this (the last status answer's `Retry-After`)."""
    outcome: CallOutcome | None = None
    reported: bool = False
    """The failed outcome was written into the operation's record once."""

    def due(self, now: datetime) -> bool:
        return self.outcome is None and (self.next_poll_at is None or now >= self.next_poll_at)

    def still_running(self, now: datetime, retry_after: float | None) -> PendingCall:
        wait = None if retry_after is None else now + timedelta(seconds=retry_after)
        return replace(self, next_poll_at=wait)

    def ended(self, outcome: CallOutcome) -> PendingCall:
        return replace(self, outcome=outcome, next_poll_at=None)

    def to_json(self) -> str:
        outcome = self.outcome
        return json.dumps(
            {
                "action": self.action,
                "call": dict(self.call),
                "sent_at": self.sent_at.isoformat(),
                "next_poll_at": self.next_poll_at.isoformat() if self.next_poll_at else None,
                "outcome": None
                if outcome is None
                else {
                    "status": outcome.status,
                    "code": outcome.code,
                    "message": outcome.message,
                    "failed_instances": dict(outcome.failed_instances),
                },
                "reported": self.reported,
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PendingCall:
        doc = json.loads(text)
        outcome = doc.get("outcome")
        next_poll_at = doc.get("next_poll_at")
        return cls(
            action=doc["action"],
            call=doc["call"],
            sent_at=datetime.fromisoformat(doc["sent_at"]),
            next_poll_at=datetime.fromisoformat(next_poll_at) if next_poll_at else None,
            outcome=None
            if outcome is None
            else CallOutcome(
                status=outcome["status"],
                code=outcome.get("code"),
                message=outcome.get("message") or "",
                failed_instances=dict(outcome.get("failed_instances") or {}),
            ),
            reported=bool(doc.get("reported")),
        )


def with_outcome(
    observation: Inventory | None, record: OperationRecord, pending: PendingCall | None
) -> Inventory | None:
    """The observation with what a failed capacity write says about its new VMs.

    A new VM that failed without a code in the list (`ProvisioningState/failed` only) takes
    the code the write's `error` gives for it (its `details` entry, or, when no entry names a
    VM, the error's own code). A VM's own code is never overwritten.
    """
    if observation is None or pending is None or pending.action != SET_CAPACITY:
        return observation
    outcome = pending.outcome
    if outcome is None or not outcome.failed:
        return observation
    baseline = record.baseline.instance_ids
    named = {vm.lower(): code for vm, code in outcome.failed_instances.items()}

    def code_for(instance_id: str) -> str | None:
        if named:
            return named.get(instance_id.lower())
        return outcome.code

    instances = tuple(
        replace(vm, failure=code_for(vm.id))
        if vm.failed and vm.failure is None and vm.id not in baseline and code_for(vm.id)
        else vm
        for vm in observation.instances
    )
    if instances == observation.instances:
        return observation
    return replace(observation, instances=instances)


def reported(record: OperationRecord, pending: PendingCall) -> OperationRecord:
    """The record with a failed write's outcome among its Azure calls (for `status` and the
    history), and, once the operation has ended, in its outcome's detail."""
    outcome = pending.outcome
    if outcome is None or not outcome.failed:
        return record
    if not pending.reported:
        code = outcome.code or "-"
        record = record.with_arm_call(f"ended:{pending.action}:{outcome.status}:{code}")
    if record.state.terminal and "request ended" not in record.outcome_detail:
        note = f"the last {pending.action} request {outcome.describe()}"
        detail = f"{record.outcome_detail}; {note}" if record.outcome_detail else note
        record = replace(record, outcome_detail=detail)
    return record
