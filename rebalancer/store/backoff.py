"""Zone capacity backoff per location, SKU and zone: the backoff table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rebalancer.store.errors import StoreUnavailable
from rebalancer.store.tables import TableAccess, _plain, _translated, _utc, encode_key


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


class Backoffs(TableAccess):
    """Back a zone off after a shortage, and tell when it may be tried again."""

    backoff: BackoffPolicy

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
