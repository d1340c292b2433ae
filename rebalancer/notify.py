"""Lifecycle notifications: CloudEvents published to an Event Grid topic.

When `REBALANCER_NOTIFY_TOPIC_ENDPOINT` is set, the app tells subscribers what it decided and
did, as CloudEvents 1.0 (see docs/observability.md for every schema):

    Rebalancer.ScaleSetImbalanced      a scale set was found out of balance (once per change)
    Rebalancer.OperationStarted        capacity was raised to move VMs
    Rebalancer.OperationSucceeded      the moves are done; sources deleted
    Rebalancer.OperationRolledBack     the VMs it created were removed; the set is as before
    Rebalancer.OperationSuperseded     someone else changed the set; nothing more is deleted
    Rebalancer.OperationFailed         it stopped and needs a person (see `detail`)
    Rebalancer.ZoneCapacityBackoff     a zone had no capacity for a size; moves there wait

`source` is the scale set's resource id, `subject` says what in it the event is about, and
`id` is stable for one fact (an operation's id and state), so a subscriber de-duplicates
redeliveries by `id`.

Building a `Notification` is pure. `EventGridNotifier` publishes through the real
`azure.eventgrid.EventGridPublisherClient` with the app's identity (imported on first use), a
bounded number of attempts, and never raises: a notification that cannot be delivered is
logged and dropped, it never breaks an operation. Its HTTP goes through azure-core's default
transport, not the app's: the basic-tier client does not pass a `transport` given to its
constructor on to its pipeline (azure-eventgrid 4.22).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rebalancer.operation import Notify, OperationRecord
    from rebalancer.verdict import Verdict

log = logging.getLogger("rebalancer.notify")

EVENT_TYPE_PREFIX = "Rebalancer."
DATA_VERSION = 1
"""`data.version` of every event; raised only for changes a subscriber must adapt to."""


class EventType(StrEnum):
    SCALE_SET_IMBALANCED = "Rebalancer.ScaleSetImbalanced"
    OPERATION_STARTED = "Rebalancer.OperationStarted"
    OPERATION_SUCCEEDED = "Rebalancer.OperationSucceeded"
    OPERATION_ROLLED_BACK = "Rebalancer.OperationRolledBack"
    OPERATION_SUPERSEDED = "Rebalancer.OperationSuperseded"
    OPERATION_FAILED = "Rebalancer.OperationFailed"
    ZONE_CAPACITY_BACKOFF = "Rebalancer.ZoneCapacityBackoff"


_OPERATION_EVENTS: Mapping[str, EventType] = {
    "scaling_out": EventType.OPERATION_STARTED,
    "succeeded": EventType.OPERATION_SUCCEEDED,
    "rolled_back": EventType.OPERATION_ROLLED_BACK,
    "superseded": EventType.OPERATION_SUPERSEDED,
    "failed": EventType.OPERATION_FAILED,
}
"""Operation states that are published. Intermediate steps (awaiting_health, scaling_in,
rolling_back) are in the logs and in `status`, not on the topic."""


@dataclass(frozen=True, slots=True)
class Notification:
    """One CloudEvent, before it is handed to the Event Grid client."""

    type: EventType
    source: str
    subject: str
    id: str
    time: datetime
    data: Mapping[str, Any]


# -- building events (pure) ----------------------------------------------------------------


def for_operation(record: OperationRecord, notify: Notify) -> Notification | None:
    """The event for an operation's `Notify` command, or None for a step that is not published.

    `notify.kind` is `operation.<state>`; the record is the one that entered that state.
    """
    state = notify.kind.removeprefix("operation.")
    event_type = _OPERATION_EVENTS.get(state)
    if event_type is None:
        return None
    last = record.history[-1] if record.history else None
    at = last.at if last is not None else record.updated_at
    terminal = record.state.terminal
    data: dict[str, Any] = {
        "version": DATA_VERSION,
        "operationId": record.operation_id,
        "scaleSetId": record.scale_set_id,
        "state": record.state.value,
        "reason": last.reason.value if last else "",
        "detail": last.detail if last else "",
        "message": notify.detail,
        "location": record.location,
        "sku": record.sku,
        "moves": [
            {"fromZone": m.from_zone, "toZone": m.to_zone, "source": m.source} for m in record.moves
        ],
        "movesNeeded": record.moves_needed,
        "targetZones": list(record.target_zones),
        "capacityBefore": record.baseline.capacity,
        "capacityTarget": record.target_capacity,
        "startedAt": record.created_at.isoformat(),
    }
    if terminal:
        data |= {
            "endedAt": at.isoformat(),
            "durationSeconds": round((at - record.created_at).total_seconds(), 3),
            "created": dict(record.created),
            "kept": list(record.kept),
            "deleted": list(record.sources) if record.state.value == "succeeded" else [],
            "removed": list(record.discarded) if record.state.value != "succeeded" else [],
            "armCalls": list(record.arm_calls),
        }
    return Notification(
        type=event_type,
        source=record.scale_set_id,
        subject=f"operations/{record.operation_id}",
        id=f"{record.operation_id}-{record.state.value}",
        time=at,
        data=data,
    )


def for_imbalance(verdict: Verdict, at: datetime) -> Notification:
    """A scale set was assessed out of balance (sent when the assessment changed)."""
    a = verdict.assessment
    zones = {z: {"total": c.total, "active": c.active} for z, c in a.zones.items()}
    counts = "-".join(f"{z}:{c.total}" for z, c in sorted(a.zones.items()))
    return Notification(
        type=EventType.SCALE_SET_IMBALANCED,
        source=a.ref.id,
        subject="assessment",
        id=_stable_id(a.ref.key, "imbalanced", counts, verdict.decision, verdict.reason, at),
        time=at,
        data={
            "version": DATA_VERSION,
            "scaleSetId": a.ref.id,
            "zones": zones,
            "decision": verdict.decision,
            "reason": verdict.reason,
            "detail": verdict.detail,
            "optIn": str(verdict.opt_in),
            "moves": [
                {"fromZone": m.from_zone, "toZone": m.to_zone, "source": m.source} for m in a.moves
            ],
        },
    )


def for_backoff(
    scale_set_id: str,
    operation_id: str | None,
    location: str,
    sku: str,
    zone: str,
    at: datetime,
    *,
    failures: int | None = None,
    until: datetime | None = None,
) -> Notification:
    """A zone had no capacity for a size: new scale-outs into it wait (shared by all sets)."""
    data: dict[str, Any] = {
        "version": DATA_VERSION,
        "scaleSetId": scale_set_id,
        "operationId": operation_id,
        "location": location.lower(),
        "sku": sku.lower(),
        "zone": zone,
        "failures": failures,
        "until": until.isoformat() if until is not None else None,
    }
    return Notification(
        type=EventType.ZONE_CAPACITY_BACKOFF,
        source=scale_set_id,
        subject=f"locations/{location.lower()}/skus/{sku.lower()}/zones/{zone}",
        id=_stable_id(location.lower(), sku.lower(), zone, at),
        time=at,
        data=data,
    )


# -- publishing ----------------------------------------------------------------------------


@dataclass
class EventGridNotifier:
    """Publishes notifications to one Event Grid topic (CloudEvents 1.0 input schema).

    `credential`: any azure-core token credential; default `DefaultAzureCredential` (the app's
    managed identity in Azure, `az login` on a workstation), which needs the role
    *EventGrid Data Sender* on the topic. `attempts` tries per event with `backoff` seconds
    doubling in between; `timeout` bounds each attempt's connect and read. Never raises.
    After an event is dropped, later events get a single attempt for `quiet_period` seconds,
    so a topic that is down or hanging cannot stall a pass over many scale sets.
    `client_options` go to each `send` call (e.g. `connection_verify` for a private CA).
    """

    endpoint: str
    credential: Any = None
    attempts: int = 3
    backoff: float = 0.5
    timeout: float = 10.0
    quiet_period: float = 300.0
    client_options: Mapping[str, Any] = field(default_factory=dict)
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    _failing_until: float = field(default=0.0, init=False, repr=False)
    _client: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.endpoint.lower().startswith("https://"):
            raise ValueError(
                f"notification topic endpoint {self.endpoint!r} must start with https:// "
                "(set REBALANCER_NOTIFY_TOPIC_ENDPOINT to the topic's endpoint)"
            )
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")

    def __call__(self, record: OperationRecord, notify: Notify) -> None:
        """The reconciler's `on_notify` hook: publish the operation's lifecycle event."""
        notification = for_operation(record, notify)
        if notification is not None:
            self.publish(notification)

    def publish(self, notification: Notification) -> bool:
        """Send one event; True when Event Grid accepted it. Failures are logged, not raised."""
        from azure.core.exceptions import AzureError

        event = self._cloud_event(notification)
        error: Exception | None = None
        attempts = 1 if self.monotonic() < self._failing_until else self.attempts
        for attempt in range(1, attempts + 1):
            try:
                self._get_client().send(
                    [event],
                    retry_total=0,
                    connection_timeout=self.timeout,
                    read_timeout=self.timeout,
                    **self.client_options,
                )
            except (AzureError, OSError, ValueError) as failure:
                error = failure
                if attempt < attempts:
                    self.sleep(self.backoff * 2 ** (attempt - 1))
                continue
            self._failing_until = 0.0
            log.info(
                "published %s for %s (%s)",
                notification.type,
                notification.source,
                notification.subject,
                extra={"eventType": str(notification.type), "scaleSetId": notification.source},
            )
            return True
        self._failing_until = self.monotonic() + self.quiet_period
        log.warning(
            "could not publish %s for %s after %d attempt(s): %s; the event is dropped "
            "(check the topic endpoint and the app's EventGrid Data Sender role)",
            notification.type,
            notification.source,
            attempts,
            _one_line(error),
            extra={"eventType": str(notification.type), "scaleSetId": notification.source},
        )
        return False

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                from azure.eventgrid import EventGridPublisherClient

                _quiet_option_warnings()

                credential = self.credential
                if credential is None:
                    from azure.identity import DefaultAzureCredential

                    credential = self.credential = DefaultAzureCredential()
                self._client = EventGridPublisherClient(self.endpoint, credential)
            return self._client

    @staticmethod
    def _cloud_event(notification: Notification) -> Any:
        from azure.core.messaging import CloudEvent

        return CloudEvent(
            source=notification.source,
            type=str(notification.type),
            data=dict(notification.data),
            subject=notification.subject,
            id=notification.id,
            time=notification.time,
            datacontenttype="application/json",
        )


class _SendOptionsFilter(logging.Filter):
    """Drop the SDK's warning that a transport option "is not a known attribute" of its event.

    The basic-tier client hands `send`'s keyword arguments (which is where transport and retry
    options go: the client's constructor does not forward them) to its CloudEvent model as
    well, which logs one warning per option per event. Only those records are dropped.
    """

    OPTIONS = ("retry_total", "connection_timeout", "read_timeout", "connection_verify")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            "is not a known attribute of class" in message
            and message.split(" ", 1)[0] in self.OPTIONS
        )


def _quiet_option_warnings() -> None:
    logger = logging.getLogger("azure.eventgrid._legacy._generated._serialization")
    if not any(isinstance(f, _SendOptionsFilter) for f in logger.filters):
        logger.addFilter(_SendOptionsFilter())


def _stable_id(*parts: object) -> str:
    """The same fact always gets the same event id (subscribers de-duplicate by id)."""
    text = "|".join(p.isoformat() if isinstance(p, datetime) else str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _one_line(error: Exception | None) -> str:
    text = str(error) if error is not None else "unknown error"
    return " ".join(text.split())[:300]
