"""What every table of the store shares: limits, keys, entity encoding, error translation,
and `TableAccess`, the table clients with the reads and writes every part builds on.

The only code that talks to azure-data-tables (imported lazily, so importing the store is
cheap). All times are timezone-aware datetimes passed in by the caller: the store never reads
the clock itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

from rebalancer.store.errors import EntityTooLarge, StoreError, StoreUnavailable

T = TypeVar("T")

MAX_ENTITY_BYTES = 1024 * 1024
"""Table Storage's limit for one entity, counted as the service does (strings as UTF-16)."""
CHUNK_UTF16_UNITS = 32_000
"""A string property holds at most 64 KiB = 32,768 UTF-16 code units; keep a margin."""
MAX_KEY_CHARS = 1024

LIVE_PARTITION = "live"
_LOCK = "lock-"
_OP = "op-"
_SLOT = "slot-"
_TABLE_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,40}$")
_TABLES = ("live", "history", "scalesets", "backoff", "events")


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Table requests sent by one Store (each HTTP response counts, retries included)."""

    reads: int = 0
    writes: int = 0

    def __sub__(self, other: StoreStats) -> StoreStats:
        return StoreStats(self.reads - other.reads, self.writes - other.writes)


def encode_key(value: str) -> str:
    """A Table key for any string: percent-encoding removes `/`, `\\`, `#`, `?` and controls.

    Scale set keys stay readable: `%2Fsubscriptions%2F...%2Fvirtualmachinescalesets%2Fweb`.
    """
    encoded = quote(value, safe="")
    if len(encoded) > MAX_KEY_CHARS - 16:
        raise ValueError(f"key too long for Table Storage ({len(encoded)} chars): {value[:80]}...")
    return encoded


def _utc(value: datetime, what: str = "time") -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {value!r}")
    return value.astimezone(UTC)


def _plain(value: datetime) -> datetime:
    """The SDK returns a datetime subclass; hand callers a plain aware UTC datetime."""
    return datetime(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        tzinfo=UTC,
    )


def _utf16_units(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def split_text(text: str, limit: int = CHUNK_UTF16_UNITS) -> list[str]:
    """Split into pieces of at most `limit` UTF-16 code units, never inside a surrogate pair."""
    if len(text) * 2 <= limit or _utf16_units(text) <= limit:
        return [text]
    pieces: list[str] = []
    start = 0
    units = 0
    for index, char in enumerate(text):
        width = 2 if ord(char) > 0xFFFF else 1
        if units + width > limit:
            pieces.append(text[start:index])
            start, units = index, 0
        units += width
    pieces.append(text[start:])
    return pieces


def _body_properties(body: str) -> dict[str, Any]:
    parts = split_text(body)
    properties: dict[str, Any] = {"BodyParts": len(parts)}
    for index, part in enumerate(parts):
        properties[f"Body{index:02d}"] = part
    return properties


def _body(entity: Mapping[str, Any]) -> str:
    return "".join(entity[f"Body{index:02d}"] for index in range(int(entity["BodyParts"])))


def entity_size(entity: Mapping[str, Any]) -> int:
    """Bytes as Table Storage counts them (documented formula; strings are UTF-16)."""
    size = 4
    for name, value in entity.items():
        if name in ("PartitionKey", "RowKey"):
            size += 2 * _utf16_units(str(value))
            continue
        size += 8 + 2 * len(name)
        if isinstance(value, str):
            size += 4 + 2 * _utf16_units(value)
        elif isinstance(value, bool):
            size += 1
        elif isinstance(value, bytes):
            size += 4 + len(value)
        else:  # int64, double, datetime, guid: at most 16 bytes
            size += 16
    return size


def _check_size(entity: Mapping[str, Any], what: str) -> None:
    size = entity_size(entity)
    if size > MAX_ENTITY_BYTES:
        raise EntityTooLarge(
            f"{what} is {size:,} bytes as Table Storage counts it (strings as UTF-16); an entity "
            f"holds at most {MAX_ENTITY_BYTES:,}: store less in it (e.g. compact the baseline)"
        )


def _fingerprint(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


class _Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reads = 0
        self.writes = 0

    def __call__(self, pipeline_response: Any) -> None:
        method = pipeline_response.http_request.method.upper()
        with self._lock:
            if method in ("GET", "HEAD"):
                self.reads += 1
            else:
                self.writes += 1

    def snapshot(self) -> StoreStats:
        with self._lock:
            return StoreStats(self.reads, self.writes)


def _table_missing(error: BaseException) -> bool:
    code = str(getattr(error, "error_code", "") or "")
    return code.endswith("TableNotFound") or "TableNotFound" in str(error)


def _error_code(error: BaseException) -> str:
    code = getattr(error, "error_code", None)
    text = str(code.value if hasattr(code, "value") else code or "")
    if text:
        return text
    match = re.search(r'"code"\s*:\s*"([A-Za-z]+)"', str(error))
    return match.group(1) if match else ""


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn SDK errors into StoreUnavailable (transient) or StoreError (with what to do)."""
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )

    try:
        yield
    except StoreError:
        raise
    except (ServiceRequestError, ServiceResponseError) as error:
        raise StoreUnavailable(
            f"{what}: Table Storage did not answer ({error.__class__.__name__}: {error}); "
            f"safe to retry later"
        ) from error
    except ClientAuthenticationError as error:
        raise StoreError(
            f"{what}: access denied or no credential ({error}); grant the app's identity "
            f"'Storage Table Data Contributor' on the storage account and check the "
            f"AzureWebJobsStorage settings"
        ) from error
    except HttpResponseError as error:
        status = error.status_code or 0
        code = _error_code(error)
        if status in (408, 429) or status >= 500:
            raise StoreUnavailable(
                f"{what}: Table Storage answered HTTP {status} {code}; safe to retry later"
            ) from error
        if status in (401, 403):
            raise StoreError(
                f"{what}: HTTP {status} {code}: grant the app's identity 'Storage Table Data "
                f"Contributor' on the storage account"
            ) from error
        raise StoreError(f"{what}: HTTP {status} {code}: {error.message}") from error
    except AzureError as error:
        raise StoreUnavailable(f"{what}: {error}; safe to retry later") from error


class TableAccess:
    """The store's table clients (`_tables`, by short name) and the primitives on them.

    Each part of the store (locks, operations, slots, backoff, scale set records, event ids)
    is a mixin over this; `rebalancer.store.Store` puts them together.
    """

    table_prefix: str
    _tables: dict[str, Any]

    def _create_table(self, name: str) -> None:
        from azure.core.exceptions import ResourceExistsError

        with (
            _translated(f"create table {self.table_prefix}{name}"),
            contextlib.suppress(ResourceExistsError),
        ):
            self._tables[name].create_table()

    def _write(self, name: str, action: Callable[[Any], T]) -> T:
        """Run a write; if the table does not exist yet, create it and run the write again."""
        from azure.core.exceptions import HttpResponseError

        table = self._tables[name]
        try:
            return action(table)
        except HttpResponseError as error:
            if not (error.status_code == 404 and _table_missing(error)):
                raise
        self._create_table(name)
        return action(table)

    def _update(self, name: str, entity: Mapping[str, Any], etag: str) -> Any:
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        return self._write(
            name,
            lambda t: t.update_entity(
                entity,
                mode=UpdateMode.REPLACE,
                etag=etag,
                match_condition=MatchConditions.IfNotModified,
            ),
        )

    def _get(self, name: str, pk: str, rk: str, select: list[str] | None = None) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._tables[name].get_entity(pk, rk, select=select)
        except ResourceNotFoundError:  # no such row, or no such table yet
            return None

    def _query(
        self,
        name: str,
        query: str,
        parameters: Mapping[str, Any],
        *,
        select: list[str] | None = None,
        limit: int | None = None,
    ) -> list[Any]:
        from azure.core.exceptions import ResourceNotFoundError

        pages = self._tables[name].query_entities(
            query, parameters=dict(parameters), select=select, results_per_page=limit
        )
        rows: list[Any] = []
        try:
            for entity in pages:
                rows.append(entity)
                if limit is not None and len(rows) >= limit:
                    break
        except ResourceNotFoundError as error:
            if not _table_missing(error):
                raise
        return rows

    def _delete_all(self, name: str, rows: list[Any], *, conditional: bool = False) -> None:
        """Delete rows, in transactions of up to 100 per partition."""
        from azure.core import MatchConditions

        by_partition: dict[str, list[Any]] = {}
        for row in rows:
            by_partition.setdefault(row["PartitionKey"], []).append(row)
        for partition_rows in by_partition.values():
            for start in range(0, len(partition_rows), 100):
                batch = partition_rows[start : start + 100]
                actions: list[tuple[Any, ...]] = []
                for row in batch:
                    key = {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"]}
                    if conditional:
                        options = {
                            "etag": row.metadata["etag"],
                            "match_condition": MatchConditions.IfNotModified,
                        }
                        actions.append(("delete", key, options))
                    else:
                        actions.append(("delete", key))
                self._delete_batch(name, actions)

    def _delete_batch(self, name: str, actions: list[tuple[Any, ...]]) -> None:
        from azure.data.tables import TableTransactionError

        try:
            self._tables[name].submit_transaction(actions)
        except TableTransactionError:
            # One row vanished or changed meanwhile: fall back to row by row, skipping it.
            for action in actions:
                with contextlib.suppress(TableTransactionError):
                    self._tables[name].submit_transaction([action])
