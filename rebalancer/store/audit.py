"""The subscription audit's checkpoint: one row in the live table, held by one invocation at a
time under a lease, so an audit longer than an invocation continues where the last one left
off."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rebalancer.store.errors import LockLost
from rebalancer.store.tables import (
    LIVE_PARTITION,
    TableAccess,
    _body,
    _body_properties,
    _check_size,
    _plain,
    _translated,
    _utc,
)

_AUDIT = "audit"


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


class AuditCheckpoints(TableAccess):
    """Take the audit, read and write its checkpoint."""

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
            entity.metadata["etag"],  # type: ignore[attr-defined]
        )
