"""Event Grid subscription events -> which scale set to reconcile, or why the event is ignored.

Pure: takes the decoded event (envelope fields and the `data` object) and the settings, and
returns a `Trigger` or an `Ignored` with a reason. Nothing here raises on bad input.

Shapes follow the subscription system topic's documented schema (`eventType`
`Microsoft.Resources.Resource{Write,Delete,Action}{Success,Failure,Cancel}`, `data.operationName`,
`data.claims`, resource ids in mixed case).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from rebalancer.azure_operations import HANDLED_OPERATION_NAMES
from rebalancer.model import OutsideChange, ScaleSetRef
from rebalancer.settings import Settings

OBJECT_ID_CLAIM = "http://schemas.microsoft.com/identity/claims/objectidentifier"
MAX_FIELD_LENGTH = 2048
"""Longer ids or names are not Azure's: the event is rejected rather than processed."""
MAX_KEYED_ID_LENGTH = 512
"""Event ids up to this long, percent-encoded as the store's keys are, key the
de-duplication row as they are; longer ones by a hash."""
MAX_RESOURCE_GROUP_NAME = 90
MAX_SCALE_SET_NAME = 64
MAX_VM_NAME = 64
"""Azure's limits on these names (Microsoft.Resources and Microsoft.Compute naming rules)."""

_SUCCESS_TYPES = frozenset(
    {
        "Microsoft.Resources.ResourceWriteSuccess",
        "Microsoft.Resources.ResourceDeleteSuccess",
        "Microsoft.Resources.ResourceActionSuccess",
    }
)
_HANDLED = frozenset(name.lower() for name in HANDLED_OPERATION_NAMES)
_VM_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)"
    r"/providers/microsoft\.compute/virtualmachines/(?P<vm>[^/]+)$",
    re.IGNORECASE,
)
_FLEXIBLE_VM_NAME = re.compile(r"^(?P<scale_set>.+)_[0-9a-f]{8}$", re.IGNORECASE)


class Change(StrEnum):
    """What the event says happened, in the rebalancer's terms."""

    SCALE_SET_WRITE = "scaleSetWrite"
    """The scale set's model changed (capacity, zones, tags, policies...)."""
    INSTANCES_DELETED = "instancesDeleted"
    """`delete/action` on the scale set: instances deleted by id."""
    INSTANCE_DELETED = "instanceDeleted"
    """One VM deleted on its own (Uniform VMSS VM, or a Flexible VM)."""
    INSTANCE_WRITE = "instanceWrite"
    """One VM's model changed (protection policy, Flexible VM update or creation)."""
    POWER_CHANGE = "powerChange"
    """VMs started, stopped or deallocated: the active count changed."""
    SCALE_SET_DELETED = "scaleSetDeleted"
    """The scale set itself is gone."""


_CHANGE_BY_OPERATION = {
    "microsoft.compute/virtualmachinescalesets/write": Change.SCALE_SET_WRITE,
    "microsoft.compute/virtualmachinescalesets/delete": Change.SCALE_SET_DELETED,
    "microsoft.compute/virtualmachinescalesets/delete/action": Change.INSTANCES_DELETED,
    "microsoft.compute/virtualmachinescalesets/virtualmachines/delete": Change.INSTANCE_DELETED,
    "microsoft.compute/virtualmachinescalesets/virtualmachines/write": Change.INSTANCE_WRITE,
    "microsoft.compute/virtualmachines/delete": Change.INSTANCE_DELETED,
    "microsoft.compute/virtualmachines/write": Change.INSTANCE_WRITE,
}


def _change(operation: str) -> Change:
    """Power actions (`.../start/action`, `deallocate`, `powerOff`) all change the active count."""
    return _CHANGE_BY_OPERATION.get(operation.lower(), Change.POWER_CHANGE)


@dataclass(frozen=True, slots=True)
class Trigger:
    """An event that concerns a scale set in scope.

    For a Flexible VM the event names only the VM: `ref` is then the scale set its default
    name points to (`<scale set>_<8 hex>`) when it has one, and `flexible_vm` carries the VM so
    the shell can match it against the scale sets it knows in `resource_group`.
    """

    event_id: str
    dedupe_key: str
    """What de-duplicates deliveries: the event id, or a hash when the id is missing or long."""
    change: Change
    operation_name: str
    subscription_id: str
    resource_group: str
    ref: ScaleSetRef | None
    flexible_vm: str | None
    caller_object_id: str | None
    outside: bool
    """Not the app's own write: counts as outside activity for the cooldown."""
    at: datetime | None

    @property
    def size_change(self) -> OutsideChange | None:
        """What the event says about the scale set's size, if anything. A scale set write is
        taken as a capacity write: that is how capacity is set (autoscale, portal, templates),
        and a write that keeps the capacity removes no VM."""
        if self.change is Change.SCALE_SET_WRITE:
            return OutsideChange.CAPACITY_WRITE
        if self.change in (Change.INSTANCES_DELETED, Change.INSTANCE_DELETED):
            return OutsideChange.VM_DELETE
        return None

    def activity_at(self, received_at: datetime) -> datetime:
        """When the outside change happened: the event's time, never later than its arrival,
        so a forged future time cannot hold a cooldown until then."""
        return received_at if self.at is None else min(self.at, received_at)


@dataclass(frozen=True, slots=True)
class Ignored:
    event_id: str
    reason: str


def envelope(event: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(id, type, subject, time, data) of an event as the Functions host decodes it.

    The host hands over an `EventGridEvent` for the Event Grid schema and a `CloudEvent` when
    the event subscription delivers CloudEvents 1.0 (`type`, `time` instead of `eventType`,
    `eventTime`); system topics put the same resource id in `subject` and the same `data` in
    both. Missing attributes and undecodable data come back as None.
    """
    try:
        data = event.get_json()
    except (AttributeError, ValueError, TypeError):
        data = None
    event_type = getattr(event, "event_type", None) or getattr(event, "type", None)
    event_time = getattr(event, "event_time", None) or getattr(event, "time", None)
    return getattr(event, "id", None), event_type, getattr(event, "subject", None), event_time, data


def classify(
    event_id: Any,
    event_type: Any,
    subject: Any,
    event_time: Any,
    data: Any,
    settings: Settings,
) -> Trigger | Ignored:
    """Decide what one event means for the rebalancer. Never raises."""
    usable_id = (
        isinstance(event_id, str)
        and 0 < len(event_id) <= MAX_FIELD_LENGTH
        and len(quote(event_id, safe="")) <= MAX_KEYED_ID_LENGTH
    )
    eid = event_id if usable_id else _shown_id(event_id)
    if isinstance(event_id, str) and len(event_id) > MAX_FIELD_LENGTH:
        return Ignored(eid, "event id is implausibly long")
    if not isinstance(event_type, str) or event_type not in _SUCCESS_TYPES:
        return Ignored(eid, f"event type {_show(event_type)} is not a successful resource change")
    if not isinstance(data, Mapping):
        return Ignored(eid, "event has no data object")
    operation = data.get("operationName")
    if not isinstance(operation, str) or operation.lower() not in _HANDLED:
        return Ignored(eid, f"operation {_show(operation)} does not affect zone balance")
    resource_id = data.get("resourceUri") if isinstance(data.get("resourceUri"), str) else subject
    if not isinstance(resource_id, str) or len(resource_id) > MAX_FIELD_LENGTH:
        return Ignored(eid, f"resource id {_show(resource_id)} is missing or too long")
    dedupe_key = event_id if usable_id else _content_key(event_id, event_type, subject, data)

    ref: ScaleSetRef | None
    flexible_vm: str | None = None
    vm_match = _VM_ID.match(resource_id)
    if vm_match is not None:
        subscription, resource_group = vm_match["sub"], vm_match["rg"]
        flexible_vm = vm_match["vm"]
        hint = _FLEXIBLE_VM_NAME.match(flexible_vm)
        ref = ScaleSetRef(subscription, resource_group, hint["scale_set"]) if hint else None
    else:
        try:
            ref = ScaleSetRef.parse(resource_id)
        except ValueError:
            return Ignored(eid, f"subject {_show(resource_id)} is not a scale set or VM id")
        subscription, resource_group = ref.subscription_id, ref.resource_group
    too_long = _name_too_long(resource_group, ref, flexible_vm)
    if too_long:
        return Ignored(eid, too_long)

    if not settings.in_scope(subscription, resource_group):
        return Ignored(eid, f"resource group {resource_group!r} is outside the configured scope")

    caller = _caller_object_id(data)
    own = (
        caller is not None
        and settings.app_principal_id is not None
        and _principal(caller) == _principal(settings.app_principal_id)
    )
    return Trigger(
        event_id=eid,
        dedupe_key=dedupe_key,
        change=_change(operation),
        operation_name=operation,
        subscription_id=subscription,
        resource_group=resource_group,
        ref=ref,
        flexible_vm=flexible_vm,
        caller_object_id=caller,
        outside=not own,
        at=_parse_time(event_time),
    )


def _shown_id(event_id: Any) -> str:
    if isinstance(event_id, str) and event_id:
        return event_id[:64] + "..."
    return "<no id>"


def _content_key(event_id: Any, event_type: Any, subject: Any, data: Any) -> str:
    """A key for an event whose id cannot be one: the same event delivered twice gets the
    same key, two different events without an id do not share one."""
    fields = [event_id, event_type, subject, data]
    try:
        content = json.dumps(fields, sort_keys=True, default=str, ensure_ascii=True)
    except (TypeError, ValueError):  # keys of mixed types, cycles: not from JSON, still keyed
        content = repr(fields)
    return "sha256:" + hashlib.sha256(content.encode()).hexdigest()


def _name_too_long(resource_group: str, ref: ScaleSetRef | None, vm: str | None) -> str | None:
    """Names Azure cannot have would not fit a Table key either: say which one."""
    for what, name, limit in (
        ("resource group name", resource_group, MAX_RESOURCE_GROUP_NAME),
        ("scale set name", ref.name if ref else None, MAX_SCALE_SET_NAME),
        ("VM name", vm, MAX_VM_NAME),
    ):
        if name is not None and len(name) > limit:
            return f"{what} {_show(name)} is longer than Azure allows ({len(name)} > {limit})"
    return None


def _principal(value: str) -> str:
    """An object id as one spelling: ARM writes `authorization.evidence.principalId` as 32 hex
    digits without dashes, the claims and the app setting with dashes."""
    text = value.strip().strip("{}").lower()
    plain = text.replace("-", "")
    return plain if re.fullmatch(r"[0-9a-f]{32}", plain) else text


def _caller_object_id(data: Mapping[str, Any]) -> str | None:
    claims = data.get("claims")
    if isinstance(claims, Mapping):
        oid = claims.get(OBJECT_ID_CLAIM) or claims.get("oid")
        if isinstance(oid, str) and oid:
            return oid
    authorization = data.get("authorization")
    if isinstance(authorization, Mapping):
        evidence = authorization.get("evidence")
        if isinstance(evidence, Mapping):
            principal = evidence.get("principalId")
            if isinstance(principal, str) and principal:
                return principal
    return None


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str):
        return None
    text = value.strip().replace("Z", "+00:00")
    # Event Grid sends 7 fractional digits; fromisoformat takes at most 6.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
