"""Table Storage adapter: operations, locks, slots, zone backoff, assessments, activity, events.

The only module that talks to azure-data-tables (imported lazily, so importing this module is
cheap). Everything the rebalancer must remember between invocations lives here; see
docs/storage.md for the tables, keys and queries.

Tables (``<prefix>`` is ``rebalancer`` unless configured):

- ``<prefix>live``: one partition ``live`` holding the per-scale-set lock rows, the in-flight
  operation of each scale set and the subscription's concurrency slots. One partition makes
  "all in-flight operations" a single cheap range query, and lets a lock row and an operation
  row change together in one transaction.
- ``<prefix>history``: finished operations, partitioned by scale set, newest first.
- ``<prefix>scalesets``: the last assessment and the last outside activity of each scale set.
- ``<prefix>backoff``: capacity backoff per location, SKU and zone.
- ``<prefix>events``: processed Event Grid event ids (expiring).

All times are timezone-aware datetimes passed in by the caller (the clock is injected): the
store never reads the clock itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from rebalancer.model import OutsideActivity, OutsideChange

T = TypeVar("T")

# -- errors ------------------------------------------------------------------------------


class StoreError(RuntimeError):
    """Table Storage refused a request in a way retrying will not fix."""


class StoreUnavailable(StoreError):
    """Table Storage is unreachable or failing transiently (connection, timeout, 5xx).

    Safe to retry later: an Event Grid handler lets it propagate so Event Grid redelivers.
    """


class ConcurrencyError(StoreError):
    """Someone else changed the row since it was read (stale ETag): re-read and decide again."""


class LockLost(ConcurrencyError):
    """The scale set's lock is no longer ours (lease expired and taken over, or released)."""


class EntityTooLarge(StoreError, ValueError):
    """A row would exceed Table Storage's limits (64 KiB per property, 1 MiB per entity)."""


class StoreConfigError(StoreError, ValueError):
    """The storage connection settings are missing or malformed."""


# -- limits ------------------------------------------------------------------------------

MAX_ENTITY_BYTES = 1024 * 1024
"""Table Storage's limit for one entity, counted as the service does (strings as UTF-16)."""
CHUNK_UTF16_UNITS = 32_000
"""A string property holds at most 64 KiB = 32,768 UTF-16 code units; keep a margin."""
MAX_KEY_CHARS = 1024

LIVE_PARTITION = "live"
_LOCK = "lock-"
_OP = "op-"
_SLOT = "slot-"
_AUDIT = "audit"
_TABLE_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,40}$")
_TABLES = ("live", "history", "scalesets", "backoff", "events")


# -- values ------------------------------------------------------------------------------


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
class Lock:
    """A held lease on one scale set. `etag` proves ownership in every later write."""

    scale_set_key: str
    owner: str
    acquired_at: datetime
    lease_until: datetime
    lease: timedelta
    etag: str


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


@dataclass(frozen=True, slots=True)
class AuditLease:
    """The subscription audit's checkpoint row, and who runs the audit now.

    `body` is the sweep's JSON (`rebalancer.sweep.Sweep`, opaque to the store). One owner at a
    time works on the audit: taking it sets `owner` and `lease_until` under the row's ETag,
    and every checkpoint written after that must carry the ETag of the one before."""

    owner: str
    lease_until: datetime
    body: str
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class StoredAssessment:
    scale_set_key: str
    fingerprint: str
    body: str
    at: datetime
    imbalanced_since: datetime | None = None
    """When the scale set last turned out of balance; None while it is balanced."""


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Capacity backoff per (location, SKU, zone): base, doubling per failure, capped.

    Defaults: 15 min, 30 min, 1 h, 2 h, then 4 h at most. A failure more than `reset_after`
    after the previous one starts again at `base`.
    """

    base: timedelta = timedelta(minutes=15)
    cap: timedelta = timedelta(hours=4)
    reset_after: timedelta = timedelta(hours=24)

    def delay(self, failures: int) -> timedelta:
        if failures < 1:
            return timedelta(0)
        # Cap the exponent first so a long failure streak cannot overflow timedelta.
        doubled = self.base * (2 ** min(failures - 1, 30))
        return min(doubled, self.cap)


@dataclass(frozen=True, slots=True)
class ZoneBackoff:
    location: str
    sku: str
    zone: str
    failures: int
    last_failure_at: datetime
    until: datetime


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Table requests sent by one Store (each HTTP response counts, retries included)."""

    reads: int = 0
    writes: int = 0

    def __sub__(self, other: StoreStats) -> StoreStats:
        return StoreStats(self.reads - other.reads, self.writes - other.writes)


@dataclass(frozen=True, slots=True)
class PurgeResult:
    operations: int
    events: int


# -- connection settings -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StorageConnection:
    """Where the tables are and how to authenticate, from `AzureWebJobsStorage`-style settings.

    Either a connection string (`UseDevelopmentStorage=true` for Azurite on its default port),
    or an identity-based table service URI with a managed identity (or, without
    `__credential`, `DefaultAzureCredential`, which also picks up a developer's `az login`).
    """

    setting: str
    connection_string: str | None = None
    table_service_uri: str | None = None
    managed_identity: bool = False
    client_id: str | None = None

    @property
    def identity_based(self) -> bool:
        return self.table_service_uri is not None

    def __repr__(self) -> str:  # never print account keys or SAS tokens
        kind = (
            f"identity-based {self.table_service_uri}"
            if self.identity_based
            else "connection string"
        )
        return f"StorageConnection({self.setting}: {kind})"


def _setting(env: Mapping[str, str], name: str) -> str | None:
    """Exact name first, then case-insensitively (App Service keeps the case it was given)."""
    value = env.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in env.items() if k.lower() == lowered), None)
    value = (value or "").strip()
    return value or None


def _sub_setting(env: Mapping[str, str], name: str, suffix: str) -> str | None:
    return _setting(env, f"{name}__{suffix}") or _setting(env, f"{name}:{suffix}")


def parse_connection(
    env: Mapping[str, str], name: str = "AzureWebJobsStorage"
) -> StorageConnection:
    """Read the storage connection named `name` from app settings (pure; no network).

    Forms, as the Functions host understands them:
    - `name` = a connection string, or `UseDevelopmentStorage=true`;
    - `name__tableServiceUri` = `https://<account>.table.core.windows.net` (identity-based),
      or `name__accountName` = `<account>` (the public-cloud URI is derived);
      optional `name__credential` = `managedidentity` and `name__clientId` (user-assigned).
    """
    connection_string = _setting(env, name)
    if connection_string:
        if "=" not in connection_string:
            raise StoreConfigError(
                f"{name} is not a storage connection string (expected 'Key=Value;...' or "
                f"UseDevelopmentStorage=true); for an identity-based connection remove it and "
                f"set {name}__tableServiceUri"
            )
        return StorageConnection(name, connection_string=connection_string)
    uri = _sub_setting(env, name, "tableServiceUri")
    account = _sub_setting(env, name, "accountName")
    if uri is None and account is not None:
        if not re.fullmatch(r"[a-z0-9]{3,24}", account):
            raise StoreConfigError(
                f"{name}__accountName={account!r} is not a storage account name "
                f"(3-24 lower-case letters and digits)"
            )
        uri = f"https://{account}.table.core.windows.net"
    if uri is None:
        raise StoreConfigError(
            f"no storage connection: set {name} to a connection string "
            f"(UseDevelopmentStorage=true locally), or {name}__tableServiceUri to "
            f"https://<account>.table.core.windows.net for an identity-based connection"
        )
    if not uri.lower().startswith("https://"):
        raise StoreConfigError(
            f"{name}__tableServiceUri={uri!r} must start with https:// "
            f"(token credentials are only sent over TLS)"
        )
    credential = _sub_setting(env, name, "credential")
    if credential is not None and credential.lower() != "managedidentity":
        raise StoreConfigError(
            f"{name}__credential={credential!r} is not supported: use 'managedidentity', "
            f"or leave it unset to use DefaultAzureCredential"
        )
    return StorageConnection(
        name,
        table_service_uri=uri.rstrip("/"),
        managed_identity=credential is not None,
        client_id=_sub_setting(env, name, "clientId"),
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


# -- keys and entities -------------------------------------------------------------------


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


_ACTIVITY_COLUMNS = {
    OutsideChange.CAPACITY_WRITE: "CapacityWrittenAt",
    OutsideChange.VM_DELETE: "VmsDeletedAt",
}


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


def _history_key(created_at: datetime, operation_id: str) -> str:
    """Newest first: RowKeys sort ascending, so invert the creation time."""
    millis = int(created_at.timestamp() * 1000)
    return f"{10**15 - millis:015d}-{encode_key(operation_id)}"


def _fingerprint(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


# -- the store ---------------------------------------------------------------------------


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


class Store:
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

    # -- housekeeping ----------------------------------------------------------------------

    @property
    def stats(self) -> StoreStats:
        return self._counter.snapshot()

    def table_names(self) -> tuple[str, ...]:
        return tuple(f"{self.table_prefix}{name}" for name in _TABLES)

    def create_tables(self) -> None:
        """Create all tables now (idempotent). Optional: writes create a missing table."""
        for name in _TABLES:
            self._create_table(name)

    def close(self) -> None:
        for table in self._tables.values():
            table.close()
        self._service.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- locks -----------------------------------------------------------------------------

    def try_acquire(
        self, scale_set_key: str, owner: str, now: datetime, lease: timedelta
    ) -> Lock | None:
        """Take the scale set's lock, or None while another owner's lease runs.

        Exactly one of several concurrent callers wins: the first lock row is created
        (create-if-absent), later takeovers replace the row under its ETag. The same owner
        calling again renews its lease.
        """
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )

        now = _utc(now, "now")
        key = f"{_LOCK}{encode_key(scale_set_key)}"
        entity = self._lock_entity(key, scale_set_key, owner, now, now + lease, lease)
        with _translated(f"acquire the lock on {scale_set_key}"):
            current = self._get("live", LIVE_PARTITION, key)
            try:
                if current is None:
                    etag = self._write("live", lambda t: t.create_entity(entity))["etag"]
                else:
                    held = current["Owner"] != owner and _plain(current["LeaseUntil"]) > now
                    if held:
                        return None
                    if current["Owner"] == owner:
                        entity["AcquiredAt"] = current["AcquiredAt"]
                    etag = self._update("live", entity, current.metadata["etag"])["etag"]
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                return None
        return Lock(scale_set_key, owner, _plain(entity["AcquiredAt"]), now + lease, lease, etag)

    def renew(self, lock: Lock, now: datetime) -> Lock:
        """Extend the lease from `now`. Raises LockLost if the lock is no longer ours."""
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        now = _utc(now, "now")
        key = f"{_LOCK}{encode_key(lock.scale_set_key)}"
        entity = self._lock_entity(
            key, lock.scale_set_key, lock.owner, lock.acquired_at, now + lock.lease, lock.lease
        )
        with _translated(f"renew the lock on {lock.scale_set_key}"):
            try:
                etag = self._update("live", entity, lock.etag)["etag"]
            except (ResourceModifiedError, ResourceNotFoundError) as error:
                raise LockLost(self._lock_lost(lock)) from error
        return replace(lock, lease_until=now + lock.lease, etag=etag)

    def release(self, lock: Lock) -> bool:
        """Give the lock up. False if it was not ours any more (nothing to release).

        `lock` may be an earlier copy of a lock that writes have renewed since (each renewal
        changes the ETag): the row is still ours while it names our owner, so it is released
        under its current ETag.
        """
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        key = f"{_LOCK}{encode_key(lock.scale_set_key)}"
        etag = lock.etag
        with _translated(f"release the lock on {lock.scale_set_key}"):
            for _ in range(2):
                try:
                    self._tables["live"].delete_entity(
                        LIVE_PARTITION,
                        key,
                        etag=etag,
                        match_condition=MatchConditions.IfNotModified,
                    )
                    return True
                except (ResourceModifiedError, ResourceNotFoundError):
                    current = self._get("live", LIVE_PARTITION, key, select=["Owner"])
                    if current is None or current.get("Owner") != lock.owner:
                        return False
                    etag = current.metadata["etag"]
        return False

    def lock_holder(self, scale_set_key: str, now: datetime) -> str | None:
        """Who holds the scale set's lock right now (for status), or None."""
        key = f"{_LOCK}{encode_key(scale_set_key)}"
        with _translated(f"read the lock on {scale_set_key}"):
            row = self._get("live", LIVE_PARTITION, key)
        if row is None or _plain(row["LeaseUntil"]) <= _utc(now, "now"):
            return None
        return str(row["Owner"])

    @staticmethod
    def _lock_entity(
        key: str,
        scale_set_key: str,
        owner: str,
        acquired_at: datetime,
        lease_until: datetime,
        lease: timedelta,
    ) -> dict[str, Any]:
        return {
            "PartitionKey": LIVE_PARTITION,
            "RowKey": key,
            "ScaleSetKey": scale_set_key,
            "Owner": owner,
            "AcquiredAt": acquired_at,
            "LeaseUntil": lease_until,
            "LeaseSeconds": lease.total_seconds(),
        }

    @staticmethod
    def _lock_lost(lock: Lock) -> str:
        return (
            f"the lock on {lock.scale_set_key} is no longer held by {lock.owner} (its lease "
            f"expired and another owner took it, or it was released): stop acting on this scale "
            f"set; the next trigger will pick it up"
        )

    # -- operations ------------------------------------------------------------------------

    def save_operation(self, row: OperationRow) -> OperationRow:
        """Create (etag None) or update (ETag must match) the operation; archive if terminal.

        Raises ConcurrencyError when the row changed since it was read, or when creating an
        operation for a scale set that already has an in-flight one.
        """
        saved, _ = self._save_operation(row, None, None)
        return saved

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

    # -- concurrency slots -----------------------------------------------------------------

    def claim_slot(self, operation_id: str, limit: int, now: datetime) -> bool:
        """Claim one of `limit` subscription-wide slots for the operation (idempotent).

        Holds under races: slot i is a row created (or taken over) under its ETag, so at most
        `limit` operations hold one. A slot is reclaimable when its operation is not in flight
        and it was claimed more than `slot_grace` ago (so claim-then-create has time to write
        the operation). False when all slots are busy. `begin_operation` does the claim and
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
                choice = self._free_slot(operation_id, limit, now)
                if isinstance(choice, bool):
                    return choice
                entity, etag = choice
                try:
                    if etag is not None:
                        self._update("live", entity, etag)
                    else:
                        self._write("live", lambda t, e=entity: t.create_entity(e))
                except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                    continue  # someone else took that slot first: look again
                return True
        return False

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

    def _free_slot(
        self, operation_id: str, limit: int, now: datetime
    ) -> bool | tuple[dict[str, Any], str | None]:
        """True if the operation holds a slot, False if none is free, else (slot row, etag)."""
        if limit < 1:
            return False
        rows = self._query(
            "live",
            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
            {"pk": LIVE_PARTITION, "lo": _OP, "hi": _SLOT[:-1] + "."},
            select=["RowKey", "OperationId", "Active", "ClaimedAt"],
        )
        in_flight = {r["OperationId"] for r in rows if r["RowKey"].startswith(_OP) and r["Active"]}
        slots = {int(r["RowKey"][len(_SLOT) :]): r for r in rows if r["RowKey"].startswith(_SLOT)}
        if any(slot["OperationId"] == operation_id for slot in slots.values()):
            return True

        def reclaimable(slot: Mapping[str, Any]) -> bool:
            return (
                slot["OperationId"] not in in_flight
                and _plain(slot["ClaimedAt"]) + self.slot_grace <= now
            )

        busy = [slot for slot in slots.values() if not reclaimable(slot)]
        free = [i for i in range(limit) if i not in slots or reclaimable(slots[i])]
        if len(busy) >= limit or not free:
            return False
        # Spread racing claimers over the free slots so fewer of them collide.
        index = free[int(_fingerprint(operation_id), 16) % len(free)]
        entity = {
            "PartitionKey": LIVE_PARTITION,
            "RowKey": f"{_SLOT}{index:03d}",
            "OperationId": operation_id,
            "ClaimedAt": now,
        }
        return entity, (slots[index].metadata["etag"] if index in slots else None)

    def release_slot(self, operation_id: str) -> None:
        """Free the operation's slot (idempotent)."""
        with _translated(f"release the concurrency slot of {operation_id}"):
            rows = self._query(
                "live",
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and OperationId eq @op",
                {"pk": LIVE_PARTITION, "lo": _SLOT, "hi": _SLOT[:-1] + ".", "op": operation_id},
                select=["PartitionKey", "RowKey"],
            )
            self._delete_all("live", rows, conditional=True)

    def slots_in_use(self) -> list[str]:
        """Operation ids holding a slot (for status)."""
        with _translated("list concurrency slots"):
            rows = self._query(
                "live",
                "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                {"pk": LIVE_PARTITION, "lo": _SLOT, "hi": _SLOT[:-1] + "."},
                select=["OperationId"],
            )
        return [row["OperationId"] for row in rows]

    # -- zone capacity backoff -------------------------------------------------------------

    def backoff_until(self, location: str, sku: str, zone: str, now: datetime) -> datetime | None:
        """When the zone may be tried again, or None if it is not backed off now."""
        entity = self._backoff_row(location, sku, zone)
        if entity is None:
            return None
        until = _plain(entity["Until"])
        return until if until > _utc(now, "now") else None

    def record_capacity_failure(
        self, location: str, sku: str, zone: str, now: datetime
    ) -> ZoneBackoff:
        """Note that a scale-out found no capacity; back the zone off exponentially."""
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )

        now = _utc(now, "now")
        pk, rk = self._backoff_keys(location, sku, zone)
        with _translated(f"record a capacity failure in {location}/{sku}/zone {zone}"):
            for _ in range(8):
                current = self._backoff_row(location, sku, zone)
                failures = 1
                if current is not None and now - _plain(current["LastFailureAt"]) <= (
                    self.backoff.reset_after
                ):
                    failures = int(current["Failures"]) + 1
                result = ZoneBackoff(
                    location.lower(),
                    sku.lower(),
                    zone,
                    failures,
                    now,
                    now + self.backoff.delay(failures),
                )
                entity = {
                    "PartitionKey": pk,
                    "RowKey": rk,
                    "Location": result.location,
                    "Sku": result.sku,
                    "Zone": zone,
                    "Failures": failures,
                    "LastFailureAt": now,
                    "Until": result.until,
                }
                try:
                    if current is None:
                        self._write("backoff", lambda t, e=entity: t.create_entity(e))
                    else:
                        self._update("backoff", entity, current.metadata["etag"])
                except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                    continue
                return result
        raise StoreUnavailable(
            f"record a capacity failure in {location}/{sku}/zone {zone}: the row kept changing "
            f"under concurrent writers; retry"
        )

    def clear_backoff(self, location: str, sku: str, zone: str) -> None:
        """Forget the zone's failures after a successful scale-out there."""
        pk, rk = self._backoff_keys(location, sku, zone)
        with _translated(f"clear the backoff of {location}/{sku}/zone {zone}"):
            self._tables["backoff"].delete_entity(pk, rk)

    def backoffs(self, now: datetime) -> list[ZoneBackoff]:
        """Zones backed off at `now` (for status)."""
        with _translated("list zone backoffs"):
            rows = self._query("backoff", "Until gt @now", {"now": _utc(now, "now")})
        return [
            ZoneBackoff(
                r["Location"],
                r["Sku"],
                r["Zone"],
                int(r["Failures"]),
                _plain(r["LastFailureAt"]),
                _plain(r["Until"]),
            )
            for r in rows
        ]

    @staticmethod
    def _backoff_keys(location: str, sku: str, zone: str) -> tuple[str, str]:
        # "|" never survives encode_key, so the RowKey cannot be ambiguous.
        return encode_key(location.lower()), f"{encode_key(sku.lower())}|{encode_key(zone)}"

    def _backoff_row(self, location: str, sku: str, zone: str) -> Any:
        pk, rk = self._backoff_keys(location, sku, zone)
        with _translated(f"read the backoff of {location}/{sku}/zone {zone}"):
            return self._get("backoff", pk, rk)

    # -- the audit's checkpoint ------------------------------------------------------------

    def audit_checkpoint(self) -> AuditLease | None:
        """The audit's checkpoint row as stored (whoever holds it), or None before the first."""
        with _translated("read the audit checkpoint"):
            entity = self._get("live", LIVE_PARTITION, _AUDIT)
        return None if entity is None else self._audit_lease(entity)

    def take_audit(
        self, owner: str, now: datetime, lease: timedelta, *, empty: Callable[[], str]
    ) -> AuditLease | None:
        """Take the audit for `owner` until `now + lease`, or None while another owner's lease
        runs. Of several concurrent callers exactly one wins (create-if-absent, then updates
        under the row's ETag). `empty()` gives the body of a row created here."""
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )

        now = _utc(now, "now")
        with _translated("take the audit"):
            current = self._get("live", LIVE_PARTITION, _AUDIT)
            body = empty() if current is None else _body(current)
            entity = self._audit_entity(owner, now + lease, body)
            try:
                if current is None:
                    etag = self._write("live", lambda t: t.create_entity(entity))["etag"]
                else:
                    if current["Owner"] != owner and _plain(current["LeaseUntil"]) > now:
                        return None
                    etag = self._update("live", entity, current.metadata["etag"])["etag"]
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                return None
        return AuditLease(owner, now + lease, body, etag)

    def save_audit(
        self, held: AuditLease, body: str, now: datetime, lease: timedelta | None
    ) -> AuditLease:
        """Write a checkpoint under the ETag of the last one; the lease runs `lease` from
        `now` (None: given up). Raises LockLost when another owner took the audit since."""
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        now = _utc(now, "now")
        until = now + lease if lease is not None else now
        entity = self._audit_entity(held.owner, until, body)
        with _translated("save the audit checkpoint"):
            try:
                etag = self._update("live", entity, held.etag or "*")["etag"]
            except (ResourceModifiedError, ResourceNotFoundError) as error:
                raise LockLost(
                    f"the audit is no longer held by {held.owner} (its lease ran out and "
                    "another invocation took it over): this one stops; the other continues "
                    "from the last checkpoint"
                ) from error
        return AuditLease(held.owner, until, body, etag)

    def _audit_entity(self, owner: str, lease_until: datetime, body: str) -> dict[str, Any]:
        entity = {
            "PartitionKey": LIVE_PARTITION,
            "RowKey": _AUDIT,
            "Owner": owner,
            "LeaseUntil": lease_until,
            **_body_properties(body),
        }
        _check_size(entity, "audit checkpoint")
        return entity

    @staticmethod
    def _audit_lease(entity: Mapping[str, Any]) -> AuditLease:
        return AuditLease(
            str(entity["Owner"]),
            _plain(entity["LeaseUntil"]),
            _body(entity),
            entity.metadata["etag"],
        )

    # -- assessments and outside activity --------------------------------------------------

    def save_assessment(
        self,
        scale_set_key: str,
        body: str,
        at: datetime,
        *,
        fingerprint: str | None = None,
        imbalanced: bool = False,
    ) -> bool:
        """Store the scale set's latest assessment only if it changed. True when written.

        `fingerprint` identifies the content that matters (default: a hash of `body`); pass
        one that leaves out timestamps, or every tick would count as a change. `imbalanced`
        keeps `ImbalancedSince`: the time of the first of consecutive out-of-balance
        assessments, however often their details change.
        """
        from azure.data.tables import UpdateMode

        fingerprint = fingerprint or _fingerprint(body)
        pk = encode_key(scale_set_key)
        with _translated(f"save the assessment of {scale_set_key}"):
            current = self._get(
                "scalesets", pk, "assessment", select=["Fingerprint", "ImbalancedSince"]
            )
            if current is not None and current.get("Fingerprint") == fingerprint:
                return False
            entity = {
                "PartitionKey": pk,
                "RowKey": "assessment",
                "ScaleSetKey": scale_set_key,
                "Fingerprint": fingerprint,
                "At": _utc(at, "at"),
                **_body_properties(body),
            }
            if imbalanced:
                since = current.get("ImbalancedSince") if current is not None else None
                entity["ImbalancedSince"] = since or _utc(at, "at")
            _check_size(entity, f"assessment of {scale_set_key}")
            self._write("scalesets", lambda t: t.upsert_entity(entity, mode=UpdateMode.REPLACE))
        return True

    def last_assessment(self, scale_set_key: str) -> StoredAssessment | None:
        with _translated(f"read the assessment of {scale_set_key}"):
            entity = self._get("scalesets", encode_key(scale_set_key), "assessment")
        if entity is None:
            return None
        since = entity.get("ImbalancedSince")
        return StoredAssessment(
            entity["ScaleSetKey"],
            entity["Fingerprint"],
            _body(entity),
            _plain(entity["At"]),
            None if since is None else _plain(since),
        )

    def record_activity(
        self, scale_set_key: str, at: datetime, kind: OutsideChange | None = None
    ) -> bool:
        """Remember an outside change to the scale set, keeping the latest, and the latest of
        its kind (a capacity write, VMs deleted) when it has one. True if the latest moved."""
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )

        at = _utc(at, "at")
        pk = encode_key(scale_set_key)
        column = None if kind is None else _ACTIVITY_COLUMNS[kind]
        with _translated(f"record outside activity on {scale_set_key}"):
            for _ in range(8):
                current = self._get("scalesets", pk, "activity")
                entity = {"PartitionKey": pk, "RowKey": "activity", "ScaleSetKey": scale_set_key}
                if current is not None:
                    entity.update(
                        {k: v for k, v in current.items() if k in _ACTIVITY_COLUMNS.values()}
                    )
                    entity["At"] = current["At"]
                moved = current is None or _plain(current["At"]) < at
                if moved:
                    entity["At"] = at
                if column is not None and (column not in entity or _plain(entity[column]) < at):
                    entity[column] = at
                elif not moved:
                    return False
                try:
                    if current is None:
                        self._write("scalesets", lambda t, e=entity: t.create_entity(e))
                    else:
                        self._update("scalesets", entity, current.metadata["etag"])
                except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                    continue
                return moved
        raise StoreUnavailable(
            f"record outside activity on {scale_set_key}: the row kept changing; retry"
        )

    def last_activity(self, scale_set_key: str) -> datetime | None:
        with _translated(f"read outside activity on {scale_set_key}"):
            entity = self._get("scalesets", encode_key(scale_set_key), "activity")
        return None if entity is None else _plain(entity["At"])

    def outside_activity(self, scale_set_key: str) -> OutsideActivity:
        """When events last reported someone writing the capacity, and deleting VMs."""
        with _translated(f"read outside activity on {scale_set_key}"):
            entity = self._get("scalesets", encode_key(scale_set_key), "activity")
        if entity is None:
            return OutsideActivity()

        def at(kind: OutsideChange) -> datetime | None:
            value = entity.get(_ACTIVITY_COLUMNS[kind])
            return None if value is None else _plain(value)

        return OutsideActivity(
            capacity_written_at=at(OutsideChange.CAPACITY_WRITE),
            vms_deleted_at=at(OutsideChange.VM_DELETE),
        )

    # -- Event Grid de-duplication ---------------------------------------------------------

    def first_delivery(self, event_id: str, now: datetime) -> bool:
        """True the first time an event id is seen (until it expires), False for duplicates.

        If handling the event then fails, call `forget_event` so Event Grid's retry is not
        mistaken for a duplicate.
        """
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )

        now = _utc(now, "now")
        entity = {
            "PartitionKey": encode_key(event_id),
            "RowKey": "event",
            "ReceivedAt": now,
            "ExpiresAt": now + self.event_ttl,
        }
        with _translated(f"record delivery of event {event_id}"):
            try:
                self._write("events", lambda t: t.create_entity(entity))
                return True
            except ResourceExistsError:
                pass
            current = self._get("events", entity["PartitionKey"], "event")
            if current is not None and _plain(current["ExpiresAt"]) > now:
                return False
            try:  # an expired id seen again counts as new
                if current is None:
                    self._write("events", lambda t: t.create_entity(entity))
                else:
                    self._update("events", entity, current.metadata["etag"])
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                return False
            return True

    def event_seen(self, event_id: str, now: datetime) -> bool:
        """Whether the event id was recorded (by `first_delivery`) and has not expired. A read."""
        now = _utc(now, "now")
        with _translated(f"look up event {event_id}"):
            current = self._get("events", encode_key(event_id), "event", select=["ExpiresAt"])
        return current is not None and _plain(current["ExpiresAt"]) > now

    def forget_event(self, event_id: str) -> None:
        with _translated(f"forget event {event_id}"):
            self._tables["events"].delete_entity(encode_key(event_id), "event")

    def purge_events(self, now: datetime) -> int:
        """Delete expired event ids."""
        with _translated("purge expired event ids"):
            expired = self._query(
                "events",
                "ExpiresAt lt @now",
                {"now": _utc(now, "now")},
                select=["PartitionKey", "RowKey"],
            )
            self._delete_all("events", expired)
        return len(expired)

    def purge(self, now: datetime, history_retention: timedelta) -> PurgeResult:
        """The daily clean-up: finished operations past retention and expired event ids."""
        return PurgeResult(
            operations=self.purge_history(_utc(now, "now") - history_retention),
            events=self.purge_events(now),
        )

    # -- table access ----------------------------------------------------------------------

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


def storage_credential(connection: StorageConnection) -> Any:
    """The token credential an identity-based connection authenticates with (None for a
    connection string): the managed identity it names, or DefaultAzureCredential."""
    if not connection.identity_based:
        return None
    if connection.managed_identity:
        from azure.identity import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=connection.client_id)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=connection.client_id)


def _service_client(
    connection: StorageConnection,
    counter: _Counter,
    options: Mapping[str, Any],
    credential: Any = None,
) -> Any:
    from azure.data.tables import TableServiceClient

    settings: dict[str, Any] = {
        "retry_total": 3,
        "connection_timeout": 10,
        "read_timeout": 30,
        **options,
        "raw_response_hook": counter,
    }
    if connection.connection_string is not None:
        try:
            return TableServiceClient.from_connection_string(
                connection.connection_string, **settings
            )
        except ValueError as error:
            raise StoreConfigError(
                f"{connection.setting}: not a usable storage connection string ({error})"
            ) from error
    if credential is None:
        credential = storage_credential(connection)
    return TableServiceClient(connection.table_service_uri or "", credential=credential, **settings)
