"""Beneath the store's API, for tests and checks: who holds a lock, which slots are taken, the
tables' names, creating them up front, planting an operation row without a lock, forgetting
an event id. Nothing the app does needs these, so they live here and not on `Store`."""

from __future__ import annotations

from datetime import datetime

from rebalancer.store import OperationRow, Store
from rebalancer.store.tables import (
    _LOCK,
    _SLOT,
    _TABLES,
    LIVE_PARTITION,
    _plain,
    _translated,
    _utc,
    encode_key,
)


def table_names(store: Store) -> tuple[str, ...]:
    return tuple(f"{store.table_prefix}{name}" for name in _TABLES)


def create_tables(store: Store) -> None:
    """Create all tables now (idempotent); the store creates a missing one on first write."""
    for name in _TABLES:
        store._create_table(name)


def lock_holder(store: Store, scale_set_key: str, now: datetime) -> str | None:
    """Who holds the scale set's lock at `now`, or None."""
    key = f"{_LOCK}{encode_key(scale_set_key)}"
    with _translated(f"read the lock on {scale_set_key}"):
        row = store._get("live", LIVE_PARTITION, key)
    if row is None or _plain(row["LeaseUntil"]) <= _utc(now, "now"):
        return None
    return str(row["Owner"])


def slots_in_use(store: Store) -> list[str]:
    """Operation ids holding a concurrency slot."""
    with _translated("list concurrency slots"):
        rows = store._query(
            "live",
            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
            {"pk": LIVE_PARTITION, "lo": _SLOT, "hi": _SLOT[:-1] + "."},
            select=["OperationId"],
        )
    return [row["OperationId"] for row in rows]


def save_operation(store: Store, row: OperationRow) -> OperationRow:
    """Create (etag None) or update (the ETag must match) an operation without holding its
    scale set's lock, archiving it when finished: how a test plants or edits a row."""
    saved, _ = store._save_operation(row, None, None)
    return saved


def forget_event(store: Store, event_id: str) -> None:
    """Forget that an event id was handled, so its next delivery counts as the first."""
    with _translated(f"forget event {event_id}"):
        store._tables["events"].delete_entity(encode_key(event_id), "event")


def claim_slot(store: Store, operation_id: str, limit: int, now: datetime) -> bool:
    """Claim one of `limit` subscription-wide slots for the operation (idempotent).

    Holds under races: slot i is a row created (or taken over) under its ETag, so at most
    `limit` operations hold one. A slot is reclaimable when its operation is not in flight
    and it was claimed more than `slot_grace` ago (so claim-then-create has time to write
    the operation). False when all slots are busy. The app's `begin_operation` does the claim and
    the operation's first write in one transaction instead.
    """
    from azure.core.exceptions import (
        ResourceExistsError,
        ResourceModifiedError,
        ResourceNotFoundError,
    )

    now = _utc(now, "now")
    with _translated(f"claim a concurrency slot for {operation_id}"):
        for _ in range(2 * limit + 8):
            choice = store._free_slot(operation_id, limit, now)
            if isinstance(choice, bool):
                return choice
            entity, etag = choice
            try:
                if etag is not None:
                    store._update("live", entity, etag)
                else:
                    store._write("live", lambda t, e=entity: t.create_entity(e))
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                continue  # someone else took that slot first: look again
            return True
    return False
