"""What the app remembers per scale set (the scalesets table): its last assessment and the
last outside activity on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from rebalancer.model import OutsideActivity, OutsideChange
from rebalancer.store.errors import StoreUnavailable
from rebalancer.store.tables import (
    TableAccess,
    _body,
    _body_properties,
    _check_size,
    _fingerprint,
    _plain,
    _translated,
    _utc,
    encode_key,
)

_ACTIVITY_COLUMNS = {
    OutsideChange.CAPACITY_WRITE: "CapacityWrittenAt",
    OutsideChange.VM_DELETE: "VmsDeletedAt",
}
"""The column of the activity row that keeps the latest outside change of each kind."""


@dataclass(frozen=True, slots=True)
class StoredAssessment:
    scale_set_key: str
    fingerprint: str
    body: str
    at: datetime
    imbalanced_since: datetime | None = None
    """When the scale set last turned out of balance; None while it is balanced."""


class ScaleSetRecords(TableAccess):
    """The last assessment and the last outside activity of each scale set."""

    def save_assessment(
        self,
        scale_set_key: str,
        body: str,
        at: datetime,
        *,
        fingerprint: str | None = None,
        imbalanced: bool = False,
        stored: str | None = None,
    ) -> bool:
        """Store the scale set's latest assessment only if it changed. True when written.

        `fingerprint` identifies the content that matters (default: a hash of `body`); pass
        one that leaves out timestamps, or every tick would count as a change. `imbalanced`
        keeps `ImbalancedSince`: the time of the first of consecutive out-of-balance
        assessments, however often their details change. `stored` is the fingerprint the
        caller read moments ago (`assessment_fingerprints`): when it is this one, nothing is
        sent; otherwise the row is read and written as without it.
        """
        from azure.data.tables import UpdateMode

        fingerprint = fingerprint or _fingerprint(body)
        if stored is not None and stored == fingerprint:
            return False
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

    def assessment_fingerprints(self, scale_set_keys: Sequence[str]) -> dict[str, str]:
        """The fingerprint of each of these scale sets' stored assessments (those that have
        one), in one range query per ascending run of the keys (the audit's page: one run, two
        where the pass wraps around its ring) instead of a point read each. Rows in a range
        that were not asked for are read and dropped."""
        wanted = set(scale_set_keys)
        fingerprints: dict[str, str] = {}
        with _translated("read the stored assessments' fingerprints"):
            for run in _ascending_runs(scale_set_keys):
                encoded = [encode_key(key) for key in run]
                entities = self._query(
                    "scalesets",
                    "PartitionKey ge @lo and PartitionKey le @hi and RowKey eq @rk",
                    {"lo": min(encoded), "hi": max(encoded), "rk": "assessment"},
                    select=["ScaleSetKey", "Fingerprint"],
                )
                for entity in entities:
                    if entity.get("ScaleSetKey") in wanted and entity.get("Fingerprint"):
                        fingerprints[entity["ScaleSetKey"]] = entity["Fingerprint"]
        return fingerprints

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


def _ascending_runs(keys: Sequence[str]) -> list[list[str]]:
    runs: list[list[str]] = []
    for key in keys:
        if runs and key > runs[-1][-1]:
            runs[-1].append(key)
        else:
            runs.append([key])
    return runs
