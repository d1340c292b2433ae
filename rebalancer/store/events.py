"""Event Grid de-duplication: the ids of events handled, until they expire (the events table)."""

from __future__ import annotations

from datetime import datetime, timedelta

from rebalancer.store.tables import TableAccess, _plain, _translated, _utc, encode_key


class EventIds(TableAccess):
    """Tell a first delivery from a duplicate."""

    event_ttl: timedelta

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
