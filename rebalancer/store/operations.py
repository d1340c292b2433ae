"""Operations: the in-flight one of each scale set (live table) and finished ones (history)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from rebalancer.store.errors import ConcurrencyError, LockLost
from rebalancer.store.locks import Lock, Locks
from rebalancer.store.slots import Slots
from rebalancer.store.tables import (
    _LOCK,
    _OP,
    LIVE_PARTITION,
    _body,
    _body_properties,
    _check_size,
    _error_code,
    _plain,
    _translated,
    _utc,
    encode_key,
)


class OperationRecordLike(Protocol):
    """What the store needs of an operation record; the store never parses its JSON."""

    @property
    def operation_id(self) -> str: ...
    @property
    def scale_set_key(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def active(self) -> bool: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...
    def to_json(self) -> str: ...


@dataclass(frozen=True, slots=True)
class OperationRow:
    """One operation as stored. `body` is the operation record's JSON (opaque to the store).

    `etag` is None until the row is first written; the store returns a copy carrying the
    ETag of what it wrote, and every later save must pass that copy (optimistic concurrency).
    An inactive (terminal) row is moved to history when saved.
    """

    operation_id: str
    scale_set_key: str
    state: str
    active: bool
    updated_at: datetime
    body: str
    created_at: datetime | None = None
    """When the operation started; defaults to `updated_at` of its first save."""
    etag: str | None = None
    call: str | None = None
    """The last Azure write the operation sent and what its status said (JSON, opaque to
    the store; `rebalancer.lro.PendingCall`)."""

    @classmethod
    def of(cls, record: OperationRecordLike, etag: str | None = None) -> OperationRow:
        """The row for an operation record (`rebalancer.operation.OperationRecord`).

        Pass the `etag` of the row the record was read from (None for a new operation).
        """
        return cls(
            operation_id=record.operation_id,
            scale_set_key=record.scale_set_key,
            state=str(record.state),
            active=record.active,
            updated_at=record.updated_at,
            body=record.to_json(),
            created_at=record.created_at,
            etag=etag,
        )


def _history_key(created_at: datetime, operation_id: str) -> str:
    """Newest first: RowKeys sort ascending, so invert the creation time."""
    millis = int(created_at.timestamp() * 1000)
    return f"{10**15 - millis:015d}-{encode_key(operation_id)}"


class Operations(Locks, Slots):
    """Write an operation's intent, read what is in flight, archive what finished."""

    def commit(self, row: OperationRow, lock: Lock, now: datetime) -> tuple[OperationRow, Lock]:
        """Save the operation and renew the lock in ONE transaction.

        The write happens only if the lock is still ours (LockLost otherwise, nothing
        written), which is how "write the intent, keep the lock" stays safe when a lease
        expired under a slow invocation.
        """
        if lock.scale_set_key != row.scale_set_key:
            raise ValueError(f"lock is for {lock.scale_set_key}, operation for {row.scale_set_key}")
        saved, renewed = self._save_operation(row, lock, _utc(now, "now"))
        assert renewed is not None
        return saved, renewed

    def active_operation(self, scale_set_key: str) -> OperationRow | None:
        """The scale set's in-flight operation (one point read), or None."""
        key = f"{_OP}{encode_key(scale_set_key)}"
        with _translated(f"read the in-flight operation of {scale_set_key}"):
            entity = self._get("live", LIVE_PARTITION, key)
            if entity is None:
                return None
            row = self._operation(entity)
            if not row.active:  # finished, archiving was interrupted: complete it
                self._archive(row)
                return None
        return row

    def active_operations(self) -> list[OperationRow]:
        """Every in-flight operation in the subscription: one range query on one partition."""
        with _translated("list in-flight operations"):
            entities = self._query(
                "live",
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and Active eq true",
                {"pk": LIVE_PARTITION, "lo": _OP, "hi": _OP[:-1] + "."},
            )
        return [self._operation(entity) for entity in entities]

    def operation_keys(self) -> frozenset[str]:
        """The scale sets with an operation row: in flight, or finished with its archiving
        interrupted (`active_operation` completes that). One range query, keys only: the
        audit asks once per page instead of reading each scale set's row."""
        with _translated("list the scale sets with an operation"):
            entities = self._query(
                "live",
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                {"pk": LIVE_PARTITION, "lo": _OP, "hi": _OP[:-1] + "."},
                select=["ScaleSetKey"],
            )
        return frozenset(entity["ScaleSetKey"] for entity in entities)

    def history(self, scale_set_key: str, limit: int = 20) -> list[OperationRow]:
        """The scale set's operations, newest first: the in-flight one, then finished ones."""
        rows: list[OperationRow] = []
        with _translated(f"read the operation history of {scale_set_key}"):
            live = self._get("live", LIVE_PARTITION, f"{_OP}{encode_key(scale_set_key)}")
            if live is not None:
                rows.append(self._operation(live))
            finished = self._query(
                "history",
                "PartitionKey eq @pk",
                {"pk": encode_key(scale_set_key)},
                limit=limit,
            )
        seen = {row.operation_id for row in rows}
        rows += [row for row in map(self._operation, finished) if row.operation_id not in seen]
        return rows[:limit]

    def finished_since(self, since: datetime, limit: int = 50) -> list[OperationRow]:
        """Finished operations of every scale set that ended at or after `since`, newest
        first (for `rebalancer status`)."""
        with _translated("list recent operations"):
            entities = self._query(
                "history", "FinishedAt ge @since", {"since": _utc(since, "since")}, limit=limit
            )
        rows = [self._operation(entity) for entity in entities]
        return sorted(rows, key=lambda row: row.updated_at, reverse=True)

    def purge_history(self, before: datetime) -> int:
        """Delete finished operations that ended before `before`; also finish any archiving."""
        before = _utc(before, "before")
        with _translated("purge operation history"):
            for entity in self._query(
                "live",
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and Active eq false",
                {"pk": LIVE_PARTITION, "lo": _OP, "hi": _OP[:-1] + "."},
            ):
                self._archive(self._operation(entity))
            old = self._query(
                "history",
                "FinishedAt lt @before",
                {"before": before},
                select=["PartitionKey", "RowKey"],
            )
            self._delete_all("history", old)
        return len(old)

    def begin_operation(
        self, row: OperationRow, lock: Lock, now: datetime, *, slot_limit: int
    ) -> tuple[OperationRow, Lock] | None:
        """Start an operation in ONE transaction: keep the lock, write it, claim a slot.

        Nothing is written unless all three hold: the lock is still ours (else LockLost),
        the scale set has no in-flight operation (else ConcurrencyError), and one of
        `slot_limit` subscription-wide slots is free (else None: try again later). The slot
        is freed when the operation is saved as finished.
        """
        from azure.core import MatchConditions
        from azure.data.tables import TableTransactionError

        if row.etag is not None or not row.active:
            raise ValueError("begin_operation starts a new, active operation (etag None)")
        if lock.scale_set_key != row.scale_set_key:
            raise ValueError(f"lock is for {lock.scale_set_key}, operation for {row.scale_set_key}")
        now = _utc(now, "now")
        row = replace(
            row,
            created_at=_utc(row.created_at or row.updated_at, "created_at"),
            updated_at=_utc(row.updated_at, "updated_at"),
        )
        condition = {"mode": "replace", "match_condition": MatchConditions.IfNotModified}
        lock_entity = self._lock_entity(
            f"{_LOCK}{encode_key(lock.scale_set_key)}",
            lock.scale_set_key,
            lock.owner,
            lock.acquired_at,
            now + lock.lease,
            lock.lease,
        )
        operation_entity = self._operation_entity(row)
        with _translated(f"begin operation {row.operation_id} on {row.scale_set_key}"):
            for attempt in range(2 * slot_limit + 8):
                choice = self._free_slot(row.operation_id, slot_limit, now)
                if choice is False:
                    return None
                actions: list[tuple[Any, ...]] = [
                    ("update", lock_entity, {**condition, "etag": lock.etag}),
                    ("create", operation_entity),
                ]
                if not isinstance(choice, bool):  # True: the slot is already ours
                    slot, etag = choice
                    if etag is None:
                        actions.append(("create", slot))
                    else:
                        actions.append(("update", slot, {**condition, "etag": etag}))
                try:
                    results = self._write("live", lambda t, a=actions: t.submit_transaction(a))
                except TableTransactionError as error:
                    index = getattr(error, "index", 0)
                    if index == 0:
                        raise LockLost(self._lock_lost(lock)) from error
                    if index == 1:
                        if attempt == 0 and self.active_operation(row.scale_set_key) is None:
                            continue  # an interrupted archive was completed: try again
                        raise ConcurrencyError(
                            f"{row.scale_set_key} already has an in-flight operation: finish "
                            f"or read it (active_operation) instead of starting another"
                        ) from error
                    continue  # another operation took that slot first: look again
                saved = replace(row, etag=results[1]["etag"])
                renewed = replace(lock, lease_until=now + lock.lease, etag=results[0]["etag"])
                return saved, renewed
        return None

    def _save_operation(
        self, row: OperationRow, lock: Lock | None, now: datetime | None
    ) -> tuple[OperationRow, Lock | None]:
        from azure.core import MatchConditions
        from azure.data.tables import TableTransactionError

        created_at = _utc(row.created_at or row.updated_at, "created_at")
        row = replace(row, created_at=created_at, updated_at=_utc(row.updated_at, "updated_at"))
        entity = self._operation_entity(row)
        condition = {"mode": "replace", "match_condition": MatchConditions.IfNotModified}
        actions: list[tuple[Any, ...]] = []
        renewed: Lock | None = None
        if lock is not None and now is not None:
            lock_key = f"{_LOCK}{encode_key(lock.scale_set_key)}"
            lock_entity = self._lock_entity(
                lock_key,
                lock.scale_set_key,
                lock.owner,
                lock.acquired_at,
                now + lock.lease,
                lock.lease,
            )
            actions.append(("update", lock_entity, {**condition, "etag": lock.etag}))
            renewed = replace(lock, lease_until=now + lock.lease)
        if row.etag is None:
            actions.append(("create", entity))
        else:
            actions.append(("update", entity, {**condition, "etag": row.etag}))
        what = f"save operation {row.operation_id} of {row.scale_set_key}"
        with _translated(what):
            for attempt in range(2):
                try:
                    results = self._write("live", lambda t: t.submit_transaction(actions))
                    break
                except TableTransactionError as error:
                    code = _error_code(error)
                    index = getattr(error, "index", len(actions) - 1)
                    if lock is not None and index == 0 and code != "EntityAlreadyExists":
                        raise LockLost(self._lock_lost(lock)) from error
                    if code == "EntityAlreadyExists":
                        # A finished operation whose archiving was interrupted still holds
                        # the live row: complete the move and try once more.
                        if attempt == 0 and self.active_operation(row.scale_set_key) is None:
                            continue
                        raise ConcurrencyError(
                            f"{row.scale_set_key} already has an in-flight operation: finish "
                            f"or read it (active_operation) instead of starting another"
                        ) from error
                    if code in ("UpdateConditionNotSatisfied", "ResourceNotFound"):
                        if row.etag is not None and not row.active:
                            archived = self._update_archived(row)
                            if archived is not None:
                                return archived, self._renewed(lock, now)
                        raise ConcurrencyError(
                            f"operation {row.operation_id} of {row.scale_set_key} changed since "
                            f"it was read (stale ETag): read it again and decide again"
                        ) from error
                    raise
            saved = replace(row, etag=results[-1]["etag"])
            if renewed is not None:
                renewed = replace(renewed, etag=results[0]["etag"])
            if not row.active:
                saved = self._archive(saved)
        return saved, renewed

    def _renewed(self, lock: Lock | None, now: datetime | None) -> Lock | None:
        return None if lock is None or now is None else self.renew(lock, now)

    def _operation_entity(self, row: OperationRow) -> dict[str, Any]:
        entity = {
            "PartitionKey": LIVE_PARTITION,
            "RowKey": f"{_OP}{encode_key(row.scale_set_key)}",
            "OperationId": row.operation_id,
            "ScaleSetKey": row.scale_set_key,
            "State": row.state,
            "Active": row.active,
            "CreatedAt": row.created_at,
            "UpdatedAt": row.updated_at,
            **_body_properties(row.body),
        }
        if row.call is not None:
            entity["Call"] = row.call
        _check_size(entity, f"operation {row.operation_id}")
        return entity

    @staticmethod
    def _operation(entity: Mapping[str, Any]) -> OperationRow:
        return OperationRow(
            operation_id=entity["OperationId"],
            scale_set_key=entity["ScaleSetKey"],
            state=entity["State"],
            active=bool(entity["Active"]),
            updated_at=_plain(entity["UpdatedAt"]),
            body=_body(entity),
            created_at=_plain(entity["CreatedAt"]),
            etag=entity.metadata["etag"],  # type: ignore[attr-defined]
            call=entity.get("Call"),
        )

    def _history_entity(self, row: OperationRow) -> dict[str, Any]:
        assert row.created_at is not None
        entity = self._operation_entity(row)
        entity["PartitionKey"] = encode_key(row.scale_set_key)
        entity["RowKey"] = _history_key(row.created_at, row.operation_id)
        entity["FinishedAt"] = row.updated_at
        return entity

    def _archive(self, row: OperationRow) -> OperationRow:
        """Move a finished operation to history and free its slot (idempotent)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError
        from azure.data.tables import UpdateMode

        history = self._history_entity(row)
        written = self._write(
            "history", lambda t: t.upsert_entity(history, mode=UpdateMode.REPLACE)
        )
        with contextlib.suppress(ResourceModifiedError):  # changed meanwhile: leave it be
            self._tables["live"].delete_entity(
                LIVE_PARTITION,
                f"{_OP}{encode_key(row.scale_set_key)}",
                etag=row.etag,
                match_condition=MatchConditions.IfNotModified,
            )
        self.release_slot(row.operation_id)
        return replace(row, etag=written["etag"])

    def _update_archived(self, row: OperationRow) -> OperationRow | None:
        """Save a change to an already archived (finished) operation, under its ETag."""
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        assert row.etag is not None
        try:
            written = self._update("history", self._history_entity(row), row.etag)
        except (ResourceModifiedError, ResourceNotFoundError):
            return None
        return replace(row, etag=written["etag"])
