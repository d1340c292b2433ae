"""Follow-ups: when to look at an in-flight operation again, and what to read then.

Pure. Azure sends an event when one of the app's own writes ends (the capacity write once its
VMs are provisioned, the delete once they are gone), but nothing when a new VM turns healthy:
without a follow-up, that step would wait for the next timer tick. A follow-up is a message
(`FollowUp`) that a durable timer (a Storage queue message with a visibility delay) delivers at
`due`; it names the operation and its place in the chain (`seq`), so that a redelivered or
duplicated message is recognised and dropped, and a chain never splits in two.

What a follow-up reads is the cheapest read that answers its question (`Check`): the instance
views of the operation's new VMs while it waits for their health (one GET per VM), the status
of its own write while that runs. Only when the answer says the operation can move on is the
scale set read in full and the operation advanced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rebalancer.lro import PendingCall
    from rebalancer.operation import OperationRecord

WRITE_POLL = timedelta(seconds=30)
"""How long a follow-up waits while the operation's own write runs: its end comes as an
event, so this is only the safety net for a lost event (azure-core's default LRO poll)."""


class Check(StrEnum):
    """The question a follow-up asks before the scale set is read in full."""

    HEALTH = "health"
    """Are the new VMs healthy yet? (instance views of those VMs)"""
    WRITE = "write"
    """Has the operation's own write ended? (its status URL)"""
    FULL = "full"
    """Nothing cheaper answers: read the scale set and advance."""


@dataclass(frozen=True, slots=True)
class FollowUp:
    """One message of an operation's follow-up chain."""

    scale_set_key: str
    operation_id: str
    seq: int
    """Its place in the chain: 0 for the one sent when the operation started."""
    due: datetime

    @property
    def label(self) -> str:
        return f"follow-up of operation {self.operation_id}"

    @property
    def dedupe_key(self) -> str:
        return f"follow-up:{self.operation_id}:{self.seq}"

    def next(self, due: datetime) -> FollowUp:
        return FollowUp(self.scale_set_key, self.operation_id, self.seq + 1, due)

    def to_json(self) -> str:
        return json.dumps(
            {
                "scaleSet": self.scale_set_key,
                "operation": self.operation_id,
                "seq": self.seq,
                "due": self.due.isoformat(),
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> FollowUp:
        """Raises ValueError naming what is wrong (a message not written by this app)."""
        try:
            doc: Any = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"follow-up message is not JSON: {error}") from error
        if not isinstance(doc, dict):
            raise ValueError(f"follow-up message is a {type(doc).__name__}, not an object")
        missing = [name for name in ("scaleSet", "operation", "seq", "due") if name not in doc]
        if missing:
            raise ValueError(f"follow-up message lacks {', '.join(missing)}: {text[:200]!r}")
        try:
            due = datetime.fromisoformat(str(doc["due"]))
            seq = int(doc["seq"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"follow-up message has a bad seq or due: {error}") from error
        if due.tzinfo is None:
            raise ValueError(f"follow-up message's due {doc['due']!r} has no time zone")
        return cls(str(doc["scaleSet"]), str(doc["operation"]), seq, due)


def check_for(record: OperationRecord, pending: PendingCall | None) -> Check:
    """What a follow-up of this operation reads first."""
    from rebalancer.operation import State

    if record.state is State.AWAITING_HEALTH and record.kept:
        return Check.HEALTH
    if pending is not None and pending.outcome is None and _waits_for_write(record, pending):
        return Check.WRITE
    return Check.FULL


def _waits_for_write(record: OperationRecord, pending: PendingCall) -> bool:
    from rebalancer.lro import DELETE_INSTANCES, SET_CAPACITY
    from rebalancer.operation import State

    if record.state is State.SCALING_OUT:
        return pending.action == SET_CAPACITY
    if record.state in (State.SCALING_IN, State.ROLLING_BACK):
        return pending.action == DELETE_INSTANCES and bool(record.delete_requested)
    return False


def next_due(
    record: OperationRecord,
    pending: PendingCall | None,
    now: datetime,
    interval: timedelta,
) -> datetime | None:
    """When the operation should be looked at again; None once it has ended.

    While new VMs get healthy, every `interval` (no event tells), but never past the health
    deadline. While the operation's own write runs, at the write's `Retry-After`, else after
    `WRITE_POLL` (its end comes as an event). Otherwise after `interval`.
    """
    if record.state.terminal:
        return None
    check = check_for(record, pending)
    if check is Check.WRITE:
        assert pending is not None
        due = now + max(interval, WRITE_POLL)
        if pending.next_poll_at is not None and pending.next_poll_at > now:
            due = max(pending.next_poll_at, now + interval)
        return due
    due = now + interval
    if check is Check.HEALTH and record.health_deadline is not None:
        due = min(due, max(record.health_deadline, now))
    return due


def all_healthy(health: dict[str, str], kept: tuple[str, ...]) -> bool:
    """Whether every kept VM's instance view says `healthy` (case-insensitive)."""
    return all(health.get(vm, "").lower() == "healthy" for vm in kept)
