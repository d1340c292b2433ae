"""The per-scale-set lock: a row in the live table with a lease, taken under its ETag."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from rebalancer.store.errors import LockLost
from rebalancer.store.tables import (
    _LOCK,
    LIVE_PARTITION,
    TableAccess,
    _plain,
    _translated,
    _utc,
    encode_key,
)


@dataclass(frozen=True, slots=True)
class Lock:
    """A held lease on one scale set. `etag` proves ownership in every later write."""

    scale_set_key: str
    owner: str
    acquired_at: datetime
    lease_until: datetime
    lease: timedelta
    etag: str


class Locks(TableAccess):
    """One actor per scale set: take, renew and release its lock."""

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
