"""Table Storage adapter: everything the rebalancer remembers between invocations.

One module per table and concept, put together by `Store`, the facade the app uses:

- ``<prefix>live`` (one partition ``live``): the per-scale-set locks (`locks.py`), the
  in-flight operation of each scale set (`operations.py`), the subscription's
  concurrency slots (`slots.py`) and the audit's checkpoint (`audit.py`). One partition
  makes "all in-flight operations" a single cheap range query, and lets a lock row and an
  operation row change in one transaction.
- ``<prefix>history``: finished operations, partitioned by scale set, newest first
  (`operations.py`).
- ``<prefix>scalesets``: the last assessment and the last outside activity of each scale set
  (`scalesets.py`).
- ``<prefix>backoff``: capacity backoff per location, SKU and zone (`backoff.py`).
- ``<prefix>events``: processed Event Grid event ids, expiring (`events.py`).

``<prefix>`` is ``rebalancer`` unless configured. `tables.py` holds what they share,
`connection.py` the settings and credential, `errors.py` the errors. See docs/storage.md for
keys and queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rebalancer.store.audit import AuditCheckpoints, AuditLease
from rebalancer.store.backoff import BackoffPolicy, Backoffs, ZoneBackoff
from rebalancer.store.connection import (
    StorageConnection,
    _service_client,
    parse_connection,
    storage_credential,
)
from rebalancer.store.errors import (
    ConcurrencyError,
    EntityTooLarge,
    LockLost,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
)
from rebalancer.store.events import EventIds
from rebalancer.store.locks import Lock
from rebalancer.store.operations import OperationRecordLike, OperationRow, Operations
from rebalancer.store.scalesets import ScaleSetRecords, StoredAssessment
from rebalancer.store.tables import (
    _TABLE_PREFIX,
    _TABLES,
    MAX_ENTITY_BYTES,
    StoreStats,
    _Counter,
    _utc,
    encode_key,
    entity_size,
    split_text,
)

__all__ = [
    "MAX_ENTITY_BYTES",
    "AuditLease",
    "BackoffPolicy",
    "ConcurrencyError",
    "EntityTooLarge",
    "Lock",
    "LockLost",
    "OperationRecordLike",
    "OperationRow",
    "PurgeResult",
    "StorageConnection",
    "Store",
    "StoreConfigError",
    "StoreError",
    "StoreStats",
    "StoreUnavailable",
    "StoredAssessment",
    "ZoneBackoff",
    "encode_key",
    "entity_size",
    "open_store",
    "parse_connection",
    "split_text",
    "storage_credential",
]


@dataclass(frozen=True, slots=True)
class PurgeResult:
    operations: int
    events: int


class Store(Operations, AuditCheckpoints, Backoffs, ScaleSetRecords, EventIds):
    """All rebalancer state in Azure Table Storage. Thread-safe; one per process is enough.

    `options` go to the azure-data-tables client (e.g. `retry_total`, `connection_timeout`).
    `credential` replaces the one an identity-based connection would build (`storage_credential`),
    so that the app authenticates once for Table Storage and Compute.
    """

    def __init__(
        self,
        connection: StorageConnection,
        *,
        table_prefix: str = "rebalancer",
        backoff: BackoffPolicy | None = None,
        event_ttl: timedelta = timedelta(hours=48),
        slot_grace: timedelta = timedelta(minutes=5),
        credential: Any = None,
        **options: Any,
    ) -> None:
        if not _TABLE_PREFIX.match(table_prefix):
            raise StoreConfigError(
                f"table prefix {table_prefix!r} must start with a letter and hold only "
                f"letters and digits (at most 41 characters)"
            )
        self.connection = connection
        self.table_prefix = table_prefix
        self.backoff = backoff or BackoffPolicy()
        self.event_ttl = event_ttl
        self.slot_grace = slot_grace
        self._counter = _Counter()
        self._service = _service_client(connection, self._counter, options, credential)
        self._tables = {
            name: self._service.get_table_client(f"{table_prefix}{name}") for name in _TABLES
        }

    @property
    def stats(self) -> StoreStats:
        return self._counter.snapshot()

    def close(self) -> None:
        for table in self._tables.values():
            table.close()
        self._service.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def purge(self, now: datetime, history_retention: timedelta) -> PurgeResult:
        """The daily clean-up: finished operations past retention and expired event ids."""
        return PurgeResult(
            operations=self.purge_history(_utc(now, "now") - history_retention),
            events=self.purge_events(now),
        )


def open_store(
    env: Mapping[str, str],
    *,
    table_prefix: str = "rebalancer",
    connection: str = "AzureWebJobsStorage",
    **options: Any,
) -> Store:
    """The app's store, from app settings. Tables are created on first use."""
    return Store(parse_connection(env, connection), table_prefix=table_prefix, **options)
