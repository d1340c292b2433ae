"""The subscription's concurrency slots: at most `maxConcurrentOperations` rows in the live
table."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from rebalancer.store.tables import (
    _OP,
    _SLOT,
    LIVE_PARTITION,
    TableAccess,
    _fingerprint,
    _plain,
    _translated,
)


class Slots(TableAccess):
    """Claim and free the subscription-wide slots."""

    slot_grace: timedelta

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
