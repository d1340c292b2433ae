"""The create-before-delete operation: a pure, level-triggered state machine.

One operation moves up to `max_surge` VMs of one scale set from its most over-provisioned
zone(s) to its under-provisioned zone(s):

    scaling_out -> awaiting_health -> scaling_in -> succeeded
         |               |                |
         +-> rolling_back -> rolled_back  +-> rolled_back (health timeout, sources kept)
         +-> superseded / failed (outside change, scale set gone, stuck Azure calls)

`start` turns an assessment into an `OperationRecord` and the first command; `advance` takes
the record and a *fresh* observation of the scale set and returns the next record and the
commands to run. Nothing here does I/O or reads a clock. The shell writes the returned record
*before* it runs the commands, so every command is the intent of a step already on disk, and
every step is safe to repeat: `SetCapacity` is absolute, `DeleteInstances` only names VMs that
are present in the observation it was decided on, and each decision is re-derived from the
observation rather than from what the last invocation believed it did.

Safety rules enforced here (the invariants of docs/safety.md):
- a source is deleted only together with a healthy replacement, or when the source itself was
  observed unhealthy and its replacement timed out (the platform's rule; a health that is not
  reported is not unhealthy), so the number of healthy active VMs never drops because of a
  delete of ours;
- a protected VM, a VM not in the latest observation, or a VM we did not create or choose is
  never deleted; sources are re-chosen from the current observation right before the delete;
- any capacity we did not set, or VMs we did not ask for, end the operation `superseded`
  with nothing deleted: the other actor's absolute capacity counts our VMs in; VMs someone
  else deleted end it `superseded` too, after removing the VMs it created, so the capacity
  handed back is always the owners' (start plus their changes); a lower capacity written
  looks the same as deletes, and the events' operation names tell which it was;
- every VM that appeared since the baseline is kept in the record, whatever happens next.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from rebalancer.evaluator import eligible_sources, zone_counts, zone_key
from rebalancer.model import (
    Instance,
    Inventory,
    OrchestrationMode,
    OutsideActivity,
    OutsideChange,
    ScaleSet,
    ScaleSetRef,
)

if TYPE_CHECKING:
    from rebalancer.evaluator import Assessment

SCHEMA_VERSION = 1
HISTORY_LIMIT = 20
ARM_CALLS_LIMIT = 20
_INLINE_BASELINE_CHARS = 2000
NO_ACTIVITY = OutsideActivity()


# --------------------------------------------------------------------------------------------
# Policy, states, reasons


@dataclass(frozen=True, slots=True)
class OperationPolicy:
    """How an operation paces itself. Defaults follow the platform feature where it has one."""

    max_surge: int = 1
    """VMs created (and later deleted) at once; the platform moves one at a time."""
    health_timeout: timedelta = timedelta(minutes=90)
    """How long new VMs get to report `HealthState/healthy` (the platform waits 90 minutes)."""
    scale_out_timeout: timedelta = timedelta(minutes=30)
    """How long the capacity change may take until its new VMs are placed and provisioned."""
    delete_grace: timedelta = timedelta(minutes=15)
    """Added to the terminate notification's `notBeforeTimeout` before a delete counts as stuck."""
    max_attempts: int = 4
    """How often a command whose effect is not visible yet is issued before the step fails."""
    retry_interval: timedelta = timedelta(minutes=2)
    """Wait before repeating such a command; doubles with each repeat (2, 4, 8 minutes...)."""
    max_observation_age: timedelta = timedelta(minutes=2)
    """Sources are chosen and deleted only from an observation that began at most this long
    ago: a read slowed down by throttling may show a new VM healthy that no longer is."""
    outside_cause_wait: timedelta = timedelta(minutes=30)
    """How long a move waits for the event that says why VMs went missing (someone deleted
    them, or wrote a lower capacity) before it keeps its VMs. Event Grid retries a delivery
    at 10 s, 30 s, 1, 5, 10 and 30 minutes."""

    def __post_init__(self) -> None:
        if self.max_surge < 1:
            raise ValueError(f"max_surge must be at least 1, got {self.max_surge}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name in (
            "health_timeout",
            "scale_out_timeout",
            "delete_grace",
            "retry_interval",
            "max_observation_age",
            "outside_cause_wait",
        ):
            if getattr(self, name) < timedelta(0):
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


class State(StrEnum):
    PLANNED = "planned"
    SCALING_OUT = "scaling_out"
    AWAITING_HEALTH = "awaiting_health"
    SCALING_IN = "scaling_in"
    SUCCEEDED = "succeeded"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    SUPERSEDED = "superseded"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({State.SUCCEEDED, State.ROLLED_BACK, State.SUPERSEDED, State.FAILED})


class Reason(StrEnum):
    """Named codes for every transition and outcome; `describe()` says it to a person."""

    SCALE_OUT_REQUESTED = "scale_out_requested"
    NEW_VMS_PLACED = "new_vms_placed"
    NEW_VMS_HEALTHY = "new_vms_healthy"
    HEALTH_TIMEOUT = "health_timeout"
    HEALTH_REGRESSED = "health_regressed"
    DELETE_REQUESTED = "delete_requested"
    MOVES_DONE = "moves_done"
    NO_CAPACITY_IN_TARGET_ZONE = "no_capacity_in_target_zone"
    NEW_VM_FAILED = "new_vm_failed"
    PLACEMENT_TIE = "placement_tie"
    NOTHING_TO_KEEP = "nothing_to_keep"
    ROLLBACK_DONE = "rollback_done"
    CAPACITY_CHANGED = "capacity_changed"
    UNEXPECTED_INSTANCES = "unexpected_instances"
    NEW_VM_REMOVED = "new_vm_removed"
    OUTSIDE_DELETE = "outside_delete"
    SCALE_SET_DELETED = "scale_set_deleted"
    SCALE_SET_BUSY = "scale_set_busy"
    STAND_DOWN = "stand_down"
    SCALE_OUT_NOT_APPLIED = "scale_out_not_applied"
    SCALE_OUT_REJECTED = "scale_out_rejected"
    SCALE_OUT_TIMEOUT = "scale_out_timeout"
    NO_NEW_VMS = "no_new_vms"
    DELETE_NOT_APPLIED = "delete_not_applied"
    DELETE_STUCK = "delete_stuck"
    DELETE_UNSAFE = "delete_unsafe"
    REPAIR_REPLACED = "repair_replaced"

    def describe(self) -> str:
        return _REASONS[self]


_REASONS: Mapping[Reason, str] = MappingProxyType(
    {
        Reason.SCALE_OUT_REQUESTED: (
            "Capacity raised by the planned number of moves so that Azure creates the new VMs."
        ),
        Reason.NEW_VMS_PLACED: (
            "The new VMs are provisioned and at least one landed in an under-provisioned zone; "
            "waiting for them to report healthy."
        ),
        Reason.NEW_VMS_HEALTHY: "Every kept new VM reports healthy; about to delete the sources.",
        Reason.HEALTH_TIMEOUT: (
            "Some new VMs did not report healthy within the health timeout; the platform's rule "
            "applies: keep whichever of the new VM and its source is healthy."
        ),
        Reason.HEALTH_REGRESSED: (
            "A new VM stopped reporting healthy before its source was deleted; waiting again "
            "until the health deadline."
        ),
        Reason.DELETE_REQUESTED: (
            "Deleting the chosen sources and any new VMs not kept; waiting for them to be gone "
            "(a terminate notification can delay this by its notBeforeTimeout)."
        ),
        Reason.MOVES_DONE: "The moves are done: the new VMs are healthy and the sources deleted.",
        Reason.NO_CAPACITY_IN_TARGET_ZONE: (
            "No new VM landed in an under-provisioned zone (that zone is likely short of capacity "
            "for this size); deleting the new VMs and backing off the zone before trying again."
        ),
        Reason.NEW_VM_FAILED: (
            "The new VMs were created in the wanted zone but failed to provision (for example "
            "an extension failed to deploy); they are deleted. The zone had capacity, so it is "
            "not backed off; check the scale set's extensions before the next move."
        ),
        Reason.PLACEMENT_TIE: (
            "Azure placed the new VM in a zone that held as many VMs as the planned zone "
            "(its placement balances VM counts, not running VMs), where it would not improve "
            "the spread of running VMs; the new VMs are deleted and no zone is backed off. "
            "The same move is not tried again until the scale set changes."
        ),
        Reason.NOTHING_TO_KEEP: (
            "No move could be completed safely (the new VMs never became healthy while their "
            "sources were healthy, or no eligible source was left), so the new VMs are deleted "
            "and the original VMs kept."
        ),
        Reason.ROLLBACK_DONE: (
            "The VMs this operation created are gone; the scale set is as it was before."
        ),
        Reason.CAPACITY_CHANGED: (
            "Someone else changed the scale set's capacity (autoscale or a person); their "
            "decision wins, nothing more is deleted, and the next audit plans again."
        ),
        Reason.UNEXPECTED_INSTANCES: (
            "VMs appeared that this operation did not ask for; someone else is scaling the set, "
            "so the operation stops without deleting anything."
        ),
        Reason.NEW_VM_REMOVED: (
            "A VM this operation created was deleted or is being deleted by someone else; "
            "their decision wins: the operation removes the other VMs it created, so the "
            "scale set ends at its owners' capacity, and the next audit plans again."
        ),
        Reason.OUTSIDE_DELETE: (
            "Someone else deleted VMs of the scale set during the operation, which lowered "
            "its owners' capacity; their decision wins: the operation deletes no source and "
            "removes the VMs it created, so the scale set ends at its owners' capacity."
        ),
        Reason.SCALE_SET_DELETED: "The scale set no longer exists.",
        Reason.SCALE_SET_BUSY: (
            "The scale set stayed in an update started by someone else for too long; the "
            "operation deletes no source and removes the VMs it created, so the scale set "
            "ends at its owners' capacity."
        ),
        Reason.STAND_DOWN: (
            "The scale set was opted out or handed to Azure's own zone balancing; the operation "
            "starts nothing new and removes only the VMs it created."
        ),
        Reason.SCALE_OUT_NOT_APPLIED: (
            "The capacity change never became visible on the scale set after repeated requests; "
            "check the app's permissions, quota and the scale set's activity log."
        ),
        Reason.SCALE_OUT_REJECTED: (
            "Azure rejected the capacity change (for example quota, SKU not available, or "
            "missing permissions); nothing was created. Fix the cause and the next audit retries."
        ),
        Reason.SCALE_OUT_TIMEOUT: (
            "The capacity change did not finish within the scale-out timeout; the VMs it "
            "created are removed."
        ),
        Reason.NO_NEW_VMS: (
            "Capacity was raised but no new VM appeared within the scale-out timeout. Capacity "
            "is left as it is: lowering it would let Azure choose which VMs to delete. Check the "
            "scale set's activity log, then set the capacity you want."
        ),
        Reason.DELETE_NOT_APPLIED: (
            "The delete request never took effect after repeated requests; the VMs listed in "
            "the record are still there. Check the app's permissions and the activity log."
        ),
        Reason.DELETE_STUCK: (
            "A delete did not finish within the terminate notification's notBeforeTimeout plus "
            "the grace period; Azure may still finish it. Check the VMs listed in the record."
        ),
        Reason.DELETE_UNSAFE: (
            "A requested delete did not take effect and the picture changed since (a new VM is "
            "gone or unhealthy, or the capacity changed), so it is not repeated."
        ),
        Reason.REPAIR_REPLACED: (
            "The scale set's automatic repairs (automaticRepairsPolicy, repairAction Replace) "
            "deleted an unhealthy VM and created a new one in its place, capacity unchanged: "
            "no outside actor. A new VM of this operation is followed to its replacement, "
            "which must report healthy itself before any source is deleted; a longer "
            "automaticRepairsPolicy.gracePeriod gives new VMs more time before a repair."
        ),
    }
)


_OUTSIDE_DELETES = frozenset({Reason.OUTSIDE_DELETE, Reason.NEW_VM_REMOVED, Reason.SCALE_SET_BUSY})
"""Someone else acted (deleted VMs, or kept the scale set updating): the operation removes
the VMs it created and ends `superseded`."""


@dataclass(frozen=True, slots=True)
class Transition:
    """One entry of a record's history: it entered `state` at `at` because of `reason`."""

    state: State
    at: datetime
    reason: Reason
    detail: str = ""


# --------------------------------------------------------------------------------------------
# Commands for the shell


@dataclass(frozen=True, slots=True)
class SetCapacity:
    """PATCH `sku.capacity` to this absolute value (idempotent), only while the scale set is
    as it was read (`If-Match: etag`): an absolute capacity written over someone else's change
    would turn their scale-out into a scale-in whose victims Azure picks."""

    capacity: int
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class DeleteInstances:
    """`delete_instances` with these ids (Flexible: VM names): present and not yet `Deleting`
    in the observation it was decided on.

    Azure rejects the whole request when one id is gone or already being deleted
    (`InvalidParameter`, "not an active ... instanceId"), so such ids are never included; if
    one vanishes just before the call, the next observation decides again.
    """

    ids: tuple[str, ...]
    capacity: int | None = None
    """The capacity the delete was decided on. Azure's delete takes no precondition, so the
    adapter reads the capacity once more right before sending and sends nothing when it
    differs: a capacity someone wrote in between must not have our delete land on top."""


@dataclass(frozen=True, slots=True)
class BackOffZone:
    """Record a capacity failure for (location, sku, zone): no new scale-out there for a while."""

    location: str
    sku: str
    zone: str
    reason: str


@dataclass(frozen=True, slots=True)
class ClearZoneBackoff:
    """A VM landed in (location, sku, zone) and a move completed: forget its backoff."""

    location: str
    sku: str
    zone: str


@dataclass(frozen=True, slots=True)
class Notify:
    """Publish a lifecycle event (`operation.<state>`); delivery is at least once."""

    kind: str
    detail: str


Command = SetCapacity | DeleteInstances | BackOffZone | ClearZoneBackoff | Notify


# --------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True, slots=True)
class PlannedMove:
    from_zone: str
    to_zone: str
    source: str


@dataclass(frozen=True, slots=True)
class Baseline:
    """The scale set before the operation: what "new VM" is measured against."""

    capacity: int
    instance_ids: frozenset[str]
    healthy: int
    """Healthy active VMs at start; our deletes never take the set below this."""
    deleting: frozenset[str] = frozenset()
    """VMs already being deleted at start; any other VM seen deleting is someone's act."""


@dataclass(frozen=True, slots=True)
class OperationRecord:
    """Everything needed to resume an operation from any point, and to explain it."""

    operation_id: str
    scale_set_id: str
    location: str
    sku: str
    mode: OrchestrationMode
    state: State
    created_at: datetime
    updated_at: datetime
    k: int
    moves: tuple[PlannedMove, ...]
    """The first `k` planned moves (their sources are candidates, re-chosen before deleting)."""
    moves_needed: int
    """All moves the assessment planned; later operations do the rest."""
    zone_needs: Mapping[str, int]
    """Under-provisioned zones -> how many new VMs each can take usefully (the target zones)."""
    baseline: Baseline
    target_capacity: int
    scale_out_confirmed: bool = False
    created: Mapping[str, str | None] = field(default_factory=lambda: MappingProxyType({}))
    """Every VM that appeared since the baseline (id -> zone): ours, as far as we know."""
    kept: tuple[str, ...] = ()
    discarded: tuple[str, ...] = ()
    """New VMs to remove: misplaced, failed, surplus, or timed out with a healthy source."""
    sources: tuple[str, ...] = ()
    delete_requested: Mapping[str, datetime] = field(default_factory=lambda: MappingProxyType({}))
    scale_out_deadline: datetime | None = None
    health_deadline: datetime | None = None
    delete_deadline: datetime | None = None
    attempts: int = 0
    """Commands issued in the current step, including the first."""
    last_request_at: datetime | None = None
    """When the current step's command was last issued (spaces out repeats)."""
    repaired: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """VMs automatic repairs replaced during the operation -> their replacements."""
    rejected: str | None = None
    """A permanent error the shell reported for the scale-out (see `scale_out_rejected`)."""
    cause_wait_since: datetime | None = None
    """When VMs were first seen missing with no event yet saying who removed them and how."""
    delete_capacity: int | None = None
    """The capacity once every delete sent so far has landed, as decided (each delete lowers
    it by one at once); None while none was sent. A capacity off by more than the deletes not
    landed yet is someone else's change, made after the decision."""
    outcome: Reason | None = None
    outcome_detail: str = ""
    history: tuple[Transition, ...] = ()
    arm_calls: tuple[str, ...] = ()

    @property
    def ref(self) -> ScaleSetRef:
        return ScaleSetRef.parse(self.scale_set_id)

    @property
    def scale_set_key(self) -> str:
        return self.ref.key

    @property
    def active(self) -> bool:
        return not self.state.terminal

    @property
    def target_zones(self) -> tuple[str, ...]:
        return tuple(sorted(self.zone_needs, key=zone_key))

    def with_arm_call(self, call_id: str) -> OperationRecord:
        """Append a request/correlation id of an Azure call made for this operation."""
        calls = (*self.arm_calls, call_id)[-ARM_CALLS_LIMIT:]
        return replace(self, arm_calls=calls)

    def to_json(self) -> str:
        return json.dumps(_encode(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OperationRecord:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"operation record is not valid JSON: {error}") from error
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
            found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(
                f"operation record has schema {found!r}, this version reads {SCHEMA_VERSION}; "
                "finish or delete in-flight operations before changing versions"
            )
        try:
            return _decode(doc)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"operation record is malformed: {error!r}") from error


@dataclass(frozen=True, slots=True)
class Step:
    """What `advance` decided: the record to persist first, then the commands to run.

    `observe_again`: the state changed without a command and the new state may act at once;
    read the scale set again and call `advance` now instead of waiting for the next trigger.
    """

    record: OperationRecord
    commands: tuple[Command, ...] = ()
    observe_again: bool = False


# --------------------------------------------------------------------------------------------
# Start


def start(
    inventory: Inventory,
    assessment: Assessment,
    policy: OperationPolicy,
    now: datetime,
    operation_id: str,
) -> tuple[OperationRecord, tuple[Command, ...]]:
    """Begin an operation for an assessment with moves: record the intent, raise capacity.

    The caller has already checked the gates (mode, opt-in, cooldown, quota, lock, slots).
    """
    scale_set = inventory.scale_set
    if not assessment.moves:
        raise ValueError(f"nothing to start for {scale_set.ref}: the assessment has no moves")
    if assessment.ref != scale_set.ref:
        raise ValueError(f"assessment of {assessment.ref} does not match {scale_set.ref}")
    if scale_set.capacity is None or not scale_set.sku_name:
        raise ValueError(f"{scale_set.ref} has no sku capacity/name; it cannot be scaled out")
    k = min(len(assessment.moves), policy.max_surge)
    needs: dict[str, int] = {}
    for move in assessment.moves:
        needs[move.to_zone] = needs.get(move.to_zone, 0) + 1
    baseline = Baseline(
        capacity=scale_set.capacity,
        instance_ids=frozenset(i.id for i in inventory.instances),
        healthy=sum(1 for i in inventory.instances if i.healthy),
        deleting=frozenset(i.id for i in inventory.instances if i.deleting),
    )
    target = scale_set.capacity + k
    record = OperationRecord(
        operation_id=operation_id,
        scale_set_id=scale_set.ref.id,
        location=scale_set.location,
        sku=scale_set.sku_name,
        mode=scale_set.mode,
        state=State.PLANNED,
        created_at=now,
        updated_at=now,
        k=k,
        moves=tuple(PlannedMove(m.from_zone, m.to_zone, m.source) for m in assessment.moves[:k]),
        moves_needed=len(assessment.moves),
        zone_needs=MappingProxyType(dict(sorted(needs.items(), key=lambda kv: zone_key(kv[0])))),
        baseline=baseline,
        target_capacity=target,
    )
    step = _begin_scale_out(record, now, policy, scale_set.etag)
    return step.record, step.commands


def _begin_scale_out(
    record: OperationRecord, now: datetime, policy: OperationPolicy, etag: str | None
) -> Step:
    detail = (
        f"capacity {record.baseline.capacity} -> {record.target_capacity} for {record.k} of "
        f"{record.moves_needed} move(s) into zone(s) {', '.join(record.target_zones)}"
    )
    record = replace(
        record,
        scale_out_deadline=now + policy.scale_out_timeout,
        attempts=1,
        last_request_at=now,
    )
    record = _enter(record, State.SCALING_OUT, now, Reason.SCALE_OUT_REQUESTED, detail)
    return Step(record, (SetCapacity(record.target_capacity, etag), _notify(record)))


def scale_out_rejected(record: OperationRecord, error: str, now: datetime) -> OperationRecord:
    """The shell's `SetCapacity` failed with a permanent error (quota, SKU, permissions).

    Only noted here: the next `advance` ends the operation `failed` if the observation confirms
    that capacity is still at the baseline and nothing was created; otherwise the level-
    triggered rules go on (a partly applied scale-out is handled like any other).
    """
    if record.state is not State.SCALING_OUT or record.scale_out_confirmed:
        return record
    return replace(record, rejected=error, updated_at=now)


# --------------------------------------------------------------------------------------------
# Advance


def advance(
    record: OperationRecord,
    observation: Inventory | None,
    policy: OperationPolicy,
    now: datetime,
    *,
    stand_down: str | None = None,
    activity: OutsideActivity = NO_ACTIVITY,
) -> Step:
    """Decide the next step from a fresh observation (`None`: the scale set is gone, 404).

    `activity`: what events reported someone else doing to the scale set's size, which tells a
    lower capacity they wrote from VMs they deleted (the observation alone cannot).

    `stand_down`: the reconciler's reason to stop managing the set (opted out, app mode
    changed); Azure's own zone balancing policy on the scale set counts as well. Standing down
    starts nothing new: before any delete is requested the operation removes only the VMs it
    created; once deletes are requested it finishes them.
    """
    if record.state.terminal:
        return Step(record)
    if observation is None:
        return _finish(record, now, State.SUPERSEDED, Reason.SCALE_SET_DELETED, "")
    if observation.scale_set.ref != record.ref:
        raise ValueError(
            f"observation of {observation.scale_set.ref} given to operation "
            f"{record.operation_id} of {record.scale_set_id}"
        )
    view = _View(record, observation, activity)
    followed = _follow_repairs(record, view, policy, now)
    if isinstance(followed, Step):
        return followed
    view = _View(followed, observation, activity)
    current = _note_new_vms(followed, view)
    waiting = current.cause_wait_since is not None
    if waiting and _missing(current, view) is None and _capacity_unexplained(current, view) is None:
        current = replace(current, cause_wait_since=None)
    if observation.scale_set.platform_rebalancing and stand_down is None:
        stand_down = "automaticZoneRebalancingPolicy was enabled on the scale set"
    if observation.scale_set.provisioning_state.lower() == "deleting":
        detail = "provisioningState is Deleting"
        step = _finish(current, now, State.SUPERSEDED, Reason.SCALE_SET_DELETED, detail)
    elif current.state is State.PLANNED:
        step = _begin_scale_out(current, now, policy, observation.scale_set.etag)
    elif current.state is State.SCALING_OUT:
        step = _scaling_out(current, view, policy, now, stand_down)
    elif current.state is State.AWAITING_HEALTH:
        step = _awaiting_health(current, view, policy, now, stand_down)
    elif current.state is State.SCALING_IN:
        step = _scaling_in(current, view, policy, now, stand_down)
    else:
        step = _await_deletes(current, view, policy, now)
    if step.record == record:
        return step
    return replace(step, record=replace(step.record, updated_at=now))


@dataclass(frozen=True, slots=True)
class _View:
    """One observation, indexed the ways the rules read it."""

    record: OperationRecord
    inventory: Inventory
    activity: OutsideActivity = NO_ACTIVITY

    @property
    def scale_set(self) -> ScaleSet:
        return self.inventory.scale_set

    @property
    def by_id(self) -> Mapping[str, Instance]:
        return self.inventory.by_id()

    @property
    def new(self) -> tuple[Instance, ...]:
        """Instances not in the baseline (nor repairs' replacements of baseline VMs), by id."""
        baseline = self.record.baseline.instance_ids
        stand_ins = {new for old, new in self.record.repaired.items() if old in baseline}
        fresh = [i for i in self.inventory.instances if i.id not in baseline | stand_ins]
        return tuple(sorted(fresh, key=Instance.sort_id))

    @property
    def live_new(self) -> tuple[Instance, ...]:
        """New instances not being deleted: overprovisioned extras on their way out, or
        VMs someone deletes, no longer stand for this operation's scale-out."""
        return tuple(i for i in self.new if not i.deleting)

    @property
    def busy(self) -> bool:
        """An update of the scale set is running (ours or anyone's). `Failed` is settled."""
        return self.scale_set.provisioning_state.lower() not in ("succeeded", "failed")


def _follow_repairs(
    record: OperationRecord, view: _View, policy: OperationPolicy, now: datetime
) -> OperationRecord | Step:
    """Read VMs that automatic repairs replaced as replaced, not as someone else's acts.

    Replace deletes a VM and creates a new one (new name and instance id) with the capacity
    unchanged, and no event says so. While the capacity is the one this operation set, a VM
    lost without our delete next to a VM that appeared unasked is taken for such a repair:
    a kept or discarded new VM of ours hands its place to the replacement (which must report
    healthy itself: nothing carries over), a VM of the baseline hands it to a VM that is not
    ours. A loss whose replacement has not shown yet is waited for, up to the scale-out
    timeout past the health deadline; then the usual rules (someone deleted it) apply.
    """
    repairs = view.scale_set.automatic_repairs
    if (
        repairs is None
        or not repairs.replaces_vms
        or record.state not in (State.AWAITING_HEALTH, State.SCALING_IN)
        or record.delete_requested
        or view.scale_set.capacity != record.target_capacity
    ):
        return record
    by_id = view.by_id
    ours = (*record.kept, *record.discarded)
    known = record.baseline.deleting | set(record.repaired)
    lost = [
        vm
        for vm in (*_sorted_ids(record.baseline.instance_ids), *ours)
        if vm not in known and (vm not in by_id or by_id[vm].deleting)
    ]
    if not lost:
        return record
    taken = set(ours) | set(record.repaired.values())
    arrivals = [i for i in view.new if i.id not in taken and not i.deleting]
    pairs: dict[str, str] = {}
    for vm in lost:
        zone = by_id[vm].zone if vm in by_id else record.created.get(vm)
        match = next((i for i in arrivals if i.zone == zone), None) or next(iter(arrivals), None)
        if match is None:
            break
        arrivals.remove(match)
        pairs[vm] = match.id
    if len(pairs) < len(lost):
        deadline = (record.health_deadline or now) + policy.scale_out_timeout
        return Step(record) if now < deadline else record
    record = replace(
        record,
        kept=tuple(pairs.get(vm, vm) for vm in record.kept),
        discarded=tuple(pairs.get(vm, vm) for vm in record.discarded),
        repaired=MappingProxyType({**record.repaired, **pairs}),
    )
    mine = [vm for vm in pairs if vm in ours]
    detail = "; ".join(
        f"{old} ({'ours' if old in ours else 'not ours'}) replaced by {new}"
        for old, new in pairs.items()
    )
    detail += f" ({repairs.describe()})"
    state = State.AWAITING_HEALTH if mine else record.state
    if mine:
        detail += f"; waiting for {', '.join(pairs[vm] for vm in mine)} to report healthy"
    return replace(_enter(record, state, now, Reason.REPAIR_REPLACED, detail), updated_at=now)


def _note_new_vms(record: OperationRecord, view: _View) -> OperationRecord:
    """Remember every VM that appeared since the baseline, so none is ever left untracked."""
    unseen = {i.id: i.zone for i in view.new if i.id not in record.created}
    if not unseen:
        return record
    return replace(record, created=MappingProxyType({**record.created, **unseen}))


def _deleted_by_others(record: OperationRecord, view: _View) -> tuple[str, ...]:
    """VMs gone or being deleted since the start that this operation did not ask to delete:
    someone else deleted them, and each such delete lowered the capacity by one."""
    by_id = view.by_id
    known = record.baseline.deleting | set(record.delete_requested) | set(record.repaired)
    candidates = [*record.baseline.instance_ids, *record.created]
    return _sorted_ids(
        vm for vm in candidates if vm not in known and (vm not in by_id or by_id[vm].deleting)
    )


def _overprovisioned(
    record: OperationRecord, view: _View, gone: Sequence[str], capacity: int | None, expected: int
) -> tuple[str, ...]:
    """The VMs among `gone` that Azure removed itself: extras of an overprovisioned Uniform
    scale-out. A delete by anyone else lowers the capacity by one; the platform's removal of
    its extras does not. So new VMs gone beyond the capacity's drop are extras. A kept VM is
    never one: it was chosen once the scale-out had ended, its extras already on their way."""
    if view.scale_set.mode is not OrchestrationMode.UNIFORM or capacity is None:
        return ()
    ours = [vm for vm in gone if vm in record.created and vm not in record.kept]
    theirs = len(gone) - len(ours)
    dropped = max(expected - capacity, 0)
    if theirs > dropped:
        return ()
    return tuple(ours[: len(gone) - dropped])


def _removed_by_others(record: OperationRecord, view: _View) -> tuple[str, ...]:
    """`_deleted_by_others` less the extras Azure removed itself."""
    gone = _deleted_by_others(record, view)
    extras = _overprovisioned(record, view, gone, view.scale_set.capacity, record.target_capacity)
    return tuple(vm for vm in gone if vm not in extras)


def _missing(
    record: OperationRecord, view: _View, gone: tuple[str, ...] | None = None
) -> tuple[str, ...] | None:
    """VMs someone else removed, when the capacity dropped by as many (None otherwise).
    `gone`: `_removed_by_others`, when the caller has it already.

    Someone deleted them, or wrote a capacity that much lower and Azure picked them: the
    observation cannot tell which, the events can.
    """
    gone = _removed_by_others(record, view) if gone is None else gone
    capacity = view.scale_set.capacity
    if gone and capacity == record.target_capacity - len(gone) and len(view.live_new) <= record.k:
        return gone
    return None


def _outside_change(
    record: OperationRecord,
    view: _View,
    policy: OperationPolicy,
    now: datetime,
) -> Step | None:
    """End the operation when capacity or instances show someone else acting, else None.

    Their decision wins, and the capacity handed back is theirs. Someone deleted VMs (the
    capacity is ours minus those deletes): the owners' capacity is the one at the start minus
    the VMs of theirs they deleted, so the VMs this operation created are removed (rolled
    back), and it ends `superseded`. Someone wrote another capacity: it is absolute and counts
    the new VMs in, so nothing is deleted. A lower capacity written looks like deletes (Azure
    removes VMs to meet it); the events say which it was, and until one does the operation
    waits, then keeps its VMs (`_unexplained_drop`). More VMs appeared than were asked for:
    someone is scaling out (and wrote a capacity that counts them in); nothing is deleted.
    Extras of an overprovisioned scale-out are neither: Azure shows them while its update runs
    and removes them itself.
    """
    capacity = view.scale_set.capacity
    expected = record.target_capacity
    gone = _removed_by_others(record, view)
    live = view.live_new
    if gone and capacity == expected:
        ours_gone = [vm for vm in gone if vm in record.created]
        if len(live) + len(ours_gone) <= record.k:
            return _roll_back_for(record, view, policy, now, gone)
        if ours_gone:
            # More new VMs than requested, one of ours among those removed, and the capacity
            # back at ours: someone scaled in (Azure picked ours) and out again. The last
            # capacity written counts the VMs there now in; removing one would undo it.
            detail = (
                f"VM(s) {', '.join(ours_gone)} of this operation removed and VM(s) "
                f"{', '.join(i.id for i in live)} added by someone else, capacity {capacity}: "
                "their capacity counts the VMs there now in"
            )
            return _finish(record, now, State.SUPERSEDED, Reason.CAPACITY_CHANGED, detail)
    missing = _missing(record, view, gone)
    if missing is not None:
        return _unexplained_drop(record, view, policy, now, missing)
    if capacity != expected:
        detail = f"capacity is {capacity}; this operation set {expected}"
        return _finish(record, now, State.SUPERSEDED, Reason.CAPACITY_CHANGED, detail)
    if len(live) > record.k and not _extras_pending(record, view, policy, now):
        listed = ", ".join(i.id for i in live)
        detail = f"{len(live)} VMs appeared ({listed}) where {record.k} were requested"
        return _finish(record, now, State.SUPERSEDED, Reason.UNEXPECTED_INSTANCES, detail)
    return None


def _roll_back_for(
    record: OperationRecord,
    view: _View,
    policy: OperationPolicy,
    now: datetime,
    gone: Sequence[str],
) -> Step:
    ours = [vm for vm in gone if vm in record.created]
    reason = Reason.NEW_VM_REMOVED if ours else Reason.OUTSIDE_DELETE
    detail = (
        f"VM(s) {', '.join(gone)} deleted by someone else; capacity is {view.scale_set.capacity}"
    )
    return _roll_back(record, view, policy, now, reason, detail)


def _unexplained_drop(
    record: OperationRecord,
    view: _View,
    policy: OperationPolicy,
    now: datetime,
    gone: Sequence[str],
) -> Step:
    """VMs gone and the capacity lower by as many: whose decision was it, and which?

    An event reporting VMs deleted: the owners keep fewer VMs, the operation's are surplus
    (rolled back). An event reporting the scale set written: the capacity is absolute and
    counts the operation's VMs in (nothing deleted). No event in a Spot set that deletes on
    eviction: evicted, as deletes. With neither yet, wait for the event up to
    `outside_cause_wait`; then keep the VMs: removing them on a guess could leave the scale
    set below a capacity its owners set, which costs availability, where keeping them costs
    only the VMs.
    """
    capacity = view.scale_set.capacity
    cause = view.activity.latest_since(record.created_at)
    if cause is OutsideChange.VM_DELETE:
        return _roll_back_for(record, view, policy, now, gone)
    listed = ", ".join(gone)
    if cause is None and view.scale_set.evicts_by_delete:
        # Spot evictions send no event: in a set that deletes on eviction, that is the cause.
        ours = [vm for vm in gone if vm in record.created]
        reason = Reason.NEW_VM_REMOVED if ours else Reason.OUTSIDE_DELETE
        detail = (
            f"VM(s) {listed} gone with no event and capacity {capacity}: evicted (Spot, "
            "evictionPolicy Delete), which lowers the capacity as a delete does"
        )
        return _roll_back(record, view, policy, now, reason, detail)
    if cause is OutsideChange.CAPACITY_WRITE:
        detail = (
            f"capacity {capacity} written by someone else (Azure removed VM(s) {listed} to "
            f"meet it); it counts this operation's VMs in"
        )
        return _finish(record, now, State.SUPERSEDED, Reason.CAPACITY_CHANGED, detail)
    detail = (
        f"VM(s) {listed} gone and capacity {capacity}, and no event in "
        f"{_minutes(policy.outside_cause_wait)} min said whether someone deleted them or wrote "
        "the capacity; the VMs this operation created are kept (check the Event Grid "
        "subscription's operation filter)"
    )
    return _wait_for_cause(record, policy, now, detail)


def _wait_for_cause(
    record: OperationRecord, policy: OperationPolicy, now: datetime, detail: str
) -> Step:
    """No event says yet whether someone deleted VMs or wrote a capacity: wait for one, up to
    `outside_cause_wait`; then end `superseded` with `detail`, deleting nothing more."""
    since = record.cause_wait_since or now
    if now < since + policy.outside_cause_wait:
        if record.cause_wait_since == since:
            return Step(record)
        return Step(replace(record, cause_wait_since=since))
    return _finish(record, now, State.SUPERSEDED, Reason.CAPACITY_CHANGED, detail)


def _minutes(span: timedelta) -> int:
    return int(span.total_seconds() // 60)


def _may_overprovision(view: _View) -> bool:
    """Uniform scale sets overprovision by default: while an update runs, more new VMs than
    requested may show, and Azure deletes the extras before the update ends."""
    return view.scale_set.mode is OrchestrationMode.UNIFORM


def _extras_pending(
    record: OperationRecord, view: _View, policy: OperationPolicy, now: datetime
) -> bool:
    """More new VMs than requested, in a Uniform scale set whose capacity is still the one
    this operation set: nobody else scaled out (that writes another capacity), so they are
    extras of Azure's overprovisioning, which Azure removes itself, also after its update
    ended early (preempted, failed). Wait for them until the scale-out deadline; removing them
    ourselves would lower the capacity with each one."""
    if record.state is not State.SCALING_OUT or not _may_overprovision(view):
        return False
    if view.scale_set.capacity != record.target_capacity:
        return False
    if len(view.live_new) <= record.k:
        return False
    if any(vm not in record.created for vm in _deleted_by_others(record, view)):
        return False  # a VM of the owners went too: a repair or a person, not overprovisioning
    deadline = record.scale_out_deadline or record.created_at + policy.scale_out_timeout
    return view.busy or now < deadline


# scaling_out ---------------------------------------------------------------------------------


def _scaling_out(
    record: OperationRecord,
    view: _View,
    policy: OperationPolicy,
    now: datetime,
    stand_down: str | None,
) -> Step:
    capacity = view.scale_set.capacity
    deadline = record.scale_out_deadline or record.created_at + policy.scale_out_timeout
    if not record.scale_out_confirmed:
        gone = _removed_by_others(record, view)
        if capacity == record.target_capacity or (
            gone and view.new and capacity == record.target_capacity - len(gone)
        ):
            # Applied; someone may have deleted VMs since, which `_outside_change` handles.
            record = replace(record, scale_out_confirmed=True, attempts=0)
        elif capacity == record.baseline.capacity:
            return _scale_out_not_visible(record, view, policy, now, stand_down, deadline)
        else:
            detail = f"capacity is {capacity}; this operation set {record.target_capacity}"
            return _finish(record, now, State.SUPERSEDED, Reason.CAPACITY_CHANGED, detail)

    outside = _outside_change(record, view, policy, now)
    if outside is not None:
        return outside
    if stand_down is not None:
        return _roll_back(record, view, policy, now, Reason.STAND_DOWN, stand_down)

    new = [i for i in view.new if not i.deleting]
    provisioning = [i for i in new if i.provisioning_state.lower() not in ("succeeded", "failed")]
    timed_out = now >= deadline
    extras = _extras_pending(record, view, policy, now)
    if (view.busy or provisioning or not new or extras) and not timed_out:
        return Step(record)
    if not new:
        detail = (
            f"capacity is {record.target_capacity} but no VM outside the baseline appeared; "
            "capacity is left as it is"
        )
        return _finish(record, now, State.FAILED, Reason.NO_NEW_VMS, detail)

    needs = dict(record.zone_needs)
    baseline = zone_counts(
        view.scale_set,
        [i for i in view.inventory.instances if i.id in record.baseline.instance_ids],
    )
    kept: list[str] = []
    discarded: list[str] = []
    for vm in new:
        target = None
        if vm.provisioning_state.lower() == "succeeded" and len(kept) < record.k:
            target = _receiving_zone(vm.zone, needs, baseline)
        if target is not None:
            kept.append(vm.id)
            needs[target] -= 1
        else:
            discarded.append(vm.id)
    placed = ", ".join(_placed(i) for i in new) or "none"
    if not kept:
        if timed_out and provisioning:
            return _roll_back(record, view, policy, now, Reason.SCALE_OUT_TIMEOUT, placed)
        detail = f"wanted zone(s) {', '.join(record.target_zones)}; new VMs: {placed}"
        short = _short_zones(record, new, baseline)
        if not short:
            failed = any(i.provisioning_state.lower() == "failed" for i in new)
            reason = Reason.NEW_VM_FAILED if failed else Reason.PLACEMENT_TIE
            return _roll_back(record, view, policy, now, reason, detail)
        backoffs = tuple(
            BackOffZone(record.location, record.sku, zone, Reason.NO_CAPACITY_IN_TARGET_ZONE.value)
            for zone in short
        )
        return _roll_back(
            record, view, policy, now, Reason.NO_CAPACITY_IN_TARGET_ZONE, detail, backoffs
        )
    record = replace(
        record,
        kept=tuple(kept),
        discarded=tuple(discarded),
        health_deadline=now + policy.health_timeout,
        attempts=0,
    )
    detail = f"new VMs: {placed}; keeping {', '.join(kept)}"
    if discarded:
        detail += f"; removing {', '.join(discarded)} with the sources"
    return _transition(
        record, State.AWAITING_HEALTH, now, Reason.NEW_VMS_PLACED, detail, again=True
    )


def _placed(vm: Instance) -> str:
    state = vm.provisioning_state + (f": {vm.failure}" if vm.failure else "")
    return f"{vm.id} in zone {vm.zone} ({state})"


def _receiving_zone(
    zone: str | None, needs: Mapping[str, int], baseline: Mapping[str, Any]
) -> str | None:
    """The planned receiving zone a new VM in `zone` stands for, or None if it is misplaced.

    A planned zone with a need left takes it. So does a zone that held as many VMs as such a
    zone when the operation started, if it has fewer active VMs than the fullest zone (the
    rule every move keeps): Azure's best-effort placement may pick either of two equally
    empty zones, or avoid the planned one for lack of capacity, and a VM in the other one
    balances the totals just as well.
    """
    if zone is None:
        return None
    if needs.get(zone, 0) > 0:
        return zone
    here = baseline.get(zone)
    if here is None or not baseline:
        return None
    if here.active >= max(count.active for count in baseline.values()):
        return None
    for target, left in needs.items():
        planned = baseline.get(target)
        if left > 0 and planned is not None and here.total == planned.total:
            return target
    return None


def _short_zones(
    record: OperationRecord, new: Sequence[Instance], baseline: Mapping[str, Any]
) -> tuple[str, ...]:
    """The target zones that showed a shortage of capacity in this scale-out, in zone order.

    Evidence is an allocation error (in its zone; a regional one, or one outside the targets,
    in all of them), or a VM placed in a zone that held more VMs than a target zone: the
    platform's placement fills the emptiest zones first, so it skipped that zone. A VM
    created in a target zone that failed for another reason (an extension) shows the zone
    had room, and a VM placed in a zone tied with the target zone on VM count is no evidence
    either: the platform may pick either.
    """
    targets = record.target_zones
    short: set[str] = set()
    for vm in new:
        if vm.allocation_failed:
            short.update([vm.zone] if vm.zone in targets else targets)
            continue
        if vm.zone in targets:
            continue
        here = baseline.get(vm.zone) if vm.zone is not None else None
        for zone in targets:
            planned = baseline.get(zone)
            if here is None or planned is None or planned.total < here.total:
                short.add(zone)
    return tuple(zone for zone in targets if zone in short)


def _scale_out_not_visible(
    record: OperationRecord,
    view: _View,
    policy: OperationPolicy,
    now: datetime,
    stand_down: str | None,
    deadline: datetime,
) -> Step:
    """Capacity still at the baseline: the scale-out was not applied (yet)."""
    live = view.live_new
    if view.busy and (len(live) <= record.k or _may_overprovision(view)) and now < deadline:
        return Step(record)  # an update runs: ours may show its VMs before its capacity
    if live:
        listed = ", ".join(i.id for i in live)
        detail = f"VMs {listed} appeared while capacity stayed at {record.baseline.capacity}"
        return _finish(record, now, State.SUPERSEDED, Reason.UNEXPECTED_INSTANCES, detail)
    if stand_down is not None:
        return _finish(record, now, State.SUPERSEDED, Reason.STAND_DOWN, stand_down)
    if record.rejected is not None:
        return _finish(record, now, State.FAILED, Reason.SCALE_OUT_REJECTED, record.rejected)
    if not _repeat_due(record, policy, now) and now < deadline:
        return Step(record)
    if record.attempts >= policy.max_attempts or now >= deadline:
        detail = (
            f"capacity still {record.baseline.capacity} after {record.attempts} request(s) "
            f"for {record.target_capacity}"
        )
        return _finish(record, now, State.FAILED, Reason.SCALE_OUT_NOT_APPLIED, detail)
    record = replace(record, attempts=record.attempts + 1, last_request_at=now)
    return Step(record, (SetCapacity(record.target_capacity, view.scale_set.etag),))


def _repeat_due(record: OperationRecord, policy: OperationPolicy, now: datetime) -> bool:
    """Has the current command had its time to show an effect (interval doubling per repeat)?

    Spacing repeats keeps a throttled or briefly failing call from using up every attempt
    within a few minutes; a command lost in a crash is still repeated on a later pass.
    """
    if record.last_request_at is None:
        return True
    wait = policy.retry_interval * 2 ** max(record.attempts - 1, 0)
    return now >= record.last_request_at + wait


# awaiting_health -----------------------------------------------------------------------------


def _awaiting_health(
    record: OperationRecord,
    view: _View,
    policy: OperationPolicy,
    now: datetime,
    stand_down: str | None,
) -> Step:
    ended = _outside_change(record, view, policy, now)
    if ended is not None:
        return ended
    if stand_down is not None:
        return _roll_back(record, view, policy, now, Reason.STAND_DOWN, stand_down)
    by_id = view.by_id
    waiting = [vm for vm in record.kept if not by_id[vm].healthy]
    if not waiting:
        detail = f"healthy: {', '.join(record.kept)}"
        return _transition(
            record, State.SCALING_IN, now, Reason.NEW_VMS_HEALTHY, detail, again=True
        )
    if record.health_deadline is not None and now >= record.health_deadline:
        detail = ", ".join(f"{vm} is {by_id[vm].health}" for vm in waiting)
        return _transition(record, State.SCALING_IN, now, Reason.HEALTH_TIMEOUT, detail, again=True)
    return Step(record)


# scaling_in ----------------------------------------------------------------------------------


def _scaling_in(
    record: OperationRecord,
    view: _View,
    policy: OperationPolicy,
    now: datetime,
    stand_down: str | None,
) -> Step:
    if record.delete_requested:
        return _await_deletes(record, view, policy, now)
    ended = _outside_change(record, view, policy, now)
    if ended is not None:
        return ended
    if stand_down is not None:
        return _roll_back(record, view, policy, now, Reason.STAND_DOWN, stand_down)
    health_deadline = record.health_deadline or now
    if view.busy:
        if now < health_deadline + policy.scale_out_timeout:
            return Step(record)  # never delete while someone else's update runs
        detail = f"provisioningState {view.scale_set.provisioning_state}"
        return _roll_back(record, view, policy, now, Reason.SCALE_SET_BUSY, detail)
    by_id = view.by_id
    regressed = [vm for vm in record.kept if not by_id[vm].healthy]
    if regressed and now < health_deadline:
        detail = ", ".join(f"{vm} is {by_id[vm].health}" for vm in regressed)
        return _transition(record, State.AWAITING_HEALTH, now, Reason.HEALTH_REGRESSED, detail)

    if _stale(view, policy, now):
        return Step(record)  # sources are chosen from a fresh observation only
    choice = _choose_sources(record, view)
    present_discards = [vm for vm in choice.discarded if vm in by_id]
    deletable = [vm for vm in present_discards if not by_id[vm].protected]
    to_delete = (*choice.sources, *(vm for vm in deletable if not by_id[vm].deleting))
    wait_for = (*choice.sources, *deletable)
    state = State.SCALING_IN if choice.kept else State.ROLLING_BACK
    reason = Reason.DELETE_REQUESTED if choice.kept else Reason.NOTHING_TO_KEEP
    record = replace(
        record,
        kept=choice.kept,
        discarded=choice.discarded,
        sources=choice.sources,
        delete_requested=MappingProxyType(dict.fromkeys(wait_for, now)),
        delete_deadline=_delete_deadline(view.scale_set, policy, now),
        delete_capacity=_after_deletes(view, to_delete),
        attempts=1,
        last_request_at=now,
    )
    detail = choice.detail
    if not wait_for:
        return _complete(record, now)
    commands = _delete(view, to_delete)
    return _transition(record, state, now, reason, detail, commands)


@dataclass(frozen=True, slots=True)
class _Choice:
    kept: tuple[str, ...]
    discarded: tuple[str, ...]
    sources: tuple[str, ...]
    detail: str


def _choose_sources(record: OperationRecord, view: _View) -> _Choice:
    """Pair each kept new VM with a source from the current most over-provisioned zone.

    Timed-out (unhealthy) new VMs go first: they may take a source observed unhealthy (the
    platform's rule: delete the unhealthy source, keep the new VM); facing a source that is
    healthy, or whose health is not known, they are discarded instead and the source stays.
    Healthy new VMs take the next best source. A new VM
    with no source that a move may take (protected, deallocated, or a zone not fuller than the
    new VM's) is discarded, which leaves the scale set as it was for that move.
    """
    by_id = view.by_id
    created = set(record.created)
    discarded = list(record.discarded)
    counted = [i for i in view.inventory.instances if i.id not in set(discarded)]
    counts = zone_counts(view.scale_set, counted)
    totals = {zone: c.total for zone, c in counts.items()}
    actives = {zone: c.active for zone, c in counts.items()}
    pool = [i for i in view.inventory.instances if i.id not in created]
    kept_vms = sorted((by_id[vm] for vm in record.kept), key=Instance.sort_id)
    order = [vm for vm in kept_vms if not vm.healthy] + [vm for vm in kept_vms if vm.healthy]
    taken: set[str] = set()
    kept: list[str] = []
    sources: list[str] = []
    notes: list[str] = []

    def drop(vm: Instance, why: str) -> None:
        discarded.append(vm.id)
        notes.append(f"removing new VM {vm.id} ({why})")
        if vm.zone in totals:
            totals[vm.zone] -= 1
            actives[vm.zone] -= int(vm.active)

    for vm in order:
        candidate = _best_source(pool, taken, totals, actives, vm)
        if candidate is None:
            mixed = [i for i in pool if i.spot != vm.spot]
            if mixed and _best_source(mixed, taken, totals, actives, vm, same_priority=False):
                kind = "Spot" if vm.spot else "regular"
                drop(vm, f"no {kind} source in a fuller zone: another would change the split")
            else:
                drop(vm, "no eligible source in a fuller zone")
            continue
        if not vm.healthy and not candidate.observed_unhealthy:
            drop(
                vm,
                f"{vm.health} at the health deadline, source {candidate.id} is {candidate.health}",
            )
            continue
        taken.add(candidate.id)
        kept.append(vm.id)
        sources.append(candidate.id)
        totals[candidate.zone] -= 1  # type: ignore[index]
        actives[candidate.zone] -= 1  # type: ignore[index]
        if vm.healthy:
            note = f"deleting source {candidate.id} in zone {candidate.zone}, replaced by {vm.id}"
        else:
            note = (
                f"deleting unhealthy source {candidate.id} in zone {candidate.zone}, keeping "
                f"new VM {vm.id} ({vm.health} at the health deadline)"
            )
        notes.append(note)
    for vm in record.discarded:
        if vm in by_id:
            notes.append(f"removing new VM {vm} (misplaced, surplus or failed)")
    return _Choice(
        kept=tuple(kept),
        discarded=tuple(dict.fromkeys(discarded)),
        sources=tuple(sources),
        detail="; ".join(notes),
    )


def _best_source(
    pool: Sequence[Instance],
    taken: set[str],
    totals: Mapping[str, int],
    actives: Mapping[str, int],
    vm: Instance,
    *,
    same_priority: bool = True,
) -> Instance | None:
    """The next source for new VM `vm`, or None when no move from a fuller zone is possible.

    Givers are the zones tied at the highest count that are fuller than `vm`'s zone and have
    more active VMs than it would have without `vm` (a move never worsens the active spread).
    Among their best candidates: unhealthy first, then the zone with most active VMs, then
    the zone name. A source has the new VM's priority (Spot or regular), so that a move
    keeps a priority mix's split as it was.
    """
    if not totals or vm.zone not in totals:
        return None
    highest = max(totals.values())
    receiver_total = totals[vm.zone]
    receiver_active = actives[vm.zone] - int(vm.active)
    best: tuple[tuple[bool, int, tuple[int, int | str]], Instance] | None = None
    for zone, total in totals.items():
        if total != highest or total <= receiver_total or actives[zone] <= receiver_active:
            continue
        candidates = [
            i
            for i in eligible_sources(pool, zone)
            if i.id not in taken and (i.spot == vm.spot or not same_priority)
        ]
        if not candidates:
            continue
        key = (candidates[0].healthy, -actives[zone], zone_key(zone))
        if best is None or key < best[0]:
            best = (key, candidates[0])
    return best[1] if best else None


# waiting for deletes -------------------------------------------------------------------------


def _await_deletes(
    record: OperationRecord, view: _View, policy: OperationPolicy, now: datetime
) -> Step:
    """Deletes were requested: wait for the VMs to go, repeat a request that did not land."""
    by_id = view.by_id
    present = [by_id[vm] for vm in record.delete_requested if vm in by_id]
    moved = _capacity_moved(record, view, policy, now, [i for i in present if not i.deleting])
    if moved is not None:
        return moved
    newly_protected = [i for i in present if i.protected and not i.deleting]
    if newly_protected:
        # Protected after our request: their owner wants them; never repeat that delete.
        skip = {i.id for i in newly_protected}
        record = replace(
            record,
            delete_requested=MappingProxyType(
                {vm: at for vm, at in record.delete_requested.items() if vm not in skip}
            ),
            outcome_detail=f"not deleted (protected meanwhile): {', '.join(sorted(skip))}",
        )
        present = [i for i in present if i.id not in skip]
    if not present:
        return _complete(record, now)
    stalled = [i for i in present if not i.deleting]
    if not stalled:
        if record.delete_deadline is not None and now >= record.delete_deadline:
            detail = f"still deleting: {', '.join(i.id for i in present)}"
            return _finish(record, now, State.FAILED, Reason.DELETE_STUCK, detail)
        return Step(record)
    if view.busy and (record.delete_deadline is None or now < record.delete_deadline):
        return Step(record)  # an update is running; a delete request now would conflict
    if not _repeat_due(record, policy, now):
        return Step(record)
    if record.attempts >= policy.max_attempts:
        detail = f"still present after {record.attempts} request(s): "
        detail += ", ".join(i.id for i in stalled)
        return _finish(record, now, State.FAILED, Reason.DELETE_NOT_APPLIED, detail)
    if _stale(view, policy, now) and any(i.id in record.sources for i in stalled):
        return Step(record)  # a source is deleted again only on a fresh observation
    unsafe = _unsafe_to_repeat(record, view, stalled)
    if unsafe:
        return _finish(record, now, State.FAILED, Reason.DELETE_UNSAFE, unsafe)
    ids = [i.id for i in stalled]
    record = replace(
        record,
        attempts=record.attempts + 1,
        last_request_at=now,
        delete_deadline=_delete_deadline(view.scale_set, policy, now),
        delete_capacity=_after_deletes(view, ids),
    )
    return Step(record, _delete(view, ids))


def _delete(view: _View, ids: Sequence[str]) -> tuple[Command, ...]:
    """The delete of `ids`, conditional on the capacity it was decided on."""
    if not ids:
        return ()
    return (DeleteInstances(_sorted_ids(ids), view.scale_set.capacity),)


def _after_deletes(view: _View, ids: Sequence[str]) -> int:
    return (view.scale_set.capacity or 0) - len(ids)


def _capacity_unexplained(record: OperationRecord, view: _View) -> int | None:
    """How far the capacity is from what our deletes explain, while some have not landed, or
    None when it is within it (or none was sent). A delete not landed has not lowered it; one
    landed has, or will once its VM is gone (Azure may count it either way)."""
    requested = [view.by_id[vm] for vm in record.delete_requested if vm in view.by_id]
    unlanded = sum(1 for i in requested if not i.deleting)
    if record.delete_capacity is None or not unlanded:
        return None
    lowest = record.delete_capacity + unlanded
    highest = lowest + (len(requested) - unlanded)
    capacity = view.scale_set.capacity or 0
    if capacity < lowest:
        return capacity - lowest
    if capacity > highest:
        return capacity - highest
    return None


def _capacity_moved(
    record: OperationRecord,
    view: _View,
    policy: OperationPolicy,
    now: datetime,
    unlanded: Sequence[Instance],
) -> Step | None:
    """Someone changed the capacity while some of our deletes had not landed (refused because
    the capacity changed right before, lost in a crash, or not applied): repeat them only when
    the change was VMs deleted, as a move is capacity-neutral beside it.

    A higher capacity, or a lower one an event says was written, is absolute and counts the
    VMs there now in: nothing more is deleted. A lower one with no event yet waits for it, up
    to `outside_cause_wait`, then keeps the VMs, as `_unexplained_drop` does.
    """
    off = _capacity_unexplained(record, view)
    if off is None:
        return None
    capacity = view.scale_set.capacity
    waiting = ", ".join(i.id for i in unlanded)
    if off > 0:
        detail = (
            f"capacity {capacity} written by someone else before the delete of {waiting} "
            "landed; it counts them in, so nothing more is deleted"
        )
        return _finish(record, now, State.SUPERSEDED, Reason.CAPACITY_CHANGED, detail)
    since = (record.last_request_at or now) - policy.max_observation_age
    cause = view.activity.latest_since(since)
    if cause is OutsideChange.VM_DELETE or (cause is None and view.scale_set.evicts_by_delete):
        return None  # VMs deleted (or evicted): the owners keep fewer; the move goes on
    if cause is OutsideChange.CAPACITY_WRITE:
        detail = (
            f"capacity {capacity} written by someone else before the delete of {waiting} "
            "landed (Azure removed VMs to meet it); it counts them in, so nothing more is "
            "deleted"
        )
        return _finish(record, now, State.SUPERSEDED, Reason.CAPACITY_CHANGED, detail)
    detail = (
        f"capacity {capacity} where the deletes leave {capacity - off}, and no event in "
        f"{_minutes(policy.outside_cause_wait)} min said whether someone deleted VMs or wrote "
        f"the capacity; {waiting} not deleted (check the Event Grid subscription's operation "
        "filter)"
    )
    return _wait_for_cause(record, policy, now, detail)


def _unsafe_to_repeat(
    record: OperationRecord, view: _View, stalled: Sequence[Instance]
) -> str | None:
    """Why repeating the delete of `stalled` would act on stale information, or None.

    New VMs (ours) are always safe to delete. A source may go again only while every one still
    present has a kept new VM present beside it, a healthy one only with a healthy new VM, and
    the capacity shows no other actor (between the target and the target minus our deletes).
    """
    if not any(i.id in record.sources for i in stalled):
        return None
    by_id = view.by_id
    replacements = [by_id[vm] for vm in record.kept if vm in by_id and not by_id[vm].deleting]
    sources = [by_id[vm] for vm in record.sources if vm in by_id]
    healthy_replacements = sum(1 for i in replacements if i.healthy)
    healthy_sources = sum(1 for i in sources if i.healthy)
    capacity = view.scale_set.capacity or 0
    lowest = record.target_capacity - len(record.delete_requested)
    if not lowest <= capacity <= record.target_capacity:
        return f"capacity is {capacity}, outside {lowest}..{record.target_capacity}"
    if len(sources) > len(replacements) or healthy_sources > healthy_replacements:
        return (
            f"{len(sources)} source(s) ({healthy_sources} healthy) left to delete but only "
            f"{len(replacements)} new VM(s) ({healthy_replacements} healthy) present"
        )
    return None


def _complete(record: OperationRecord, now: datetime) -> Step:
    """Every requested delete is done: the operation ends."""
    if record.state is State.SCALING_IN and record.kept:
        zones = sorted({record.created.get(vm) for vm in record.kept} - {None}, key=zone_key)
        clears = tuple(ClearZoneBackoff(record.location, record.sku, z) for z in zones if z)
        detail = f"moved {len(record.kept)} VM(s): deleted {', '.join(record.sources)}; "
        detail += f"kept new {', '.join(record.kept)}"
        if record.outcome_detail:
            detail += f"; {record.outcome_detail}"
        return _finish(record, now, State.SUCCEEDED, Reason.MOVES_DONE, detail, clears)
    detail = f"removed {', '.join(_sorted_ids(record.delete_requested)) or 'nothing'}"
    if record.history and record.history[-1].state is State.ROLLING_BACK:
        why = record.history[-1]
        detail += f"; rolled back for {why.reason.value}"
        detail += f": {why.detail}" if why.detail else ""
        if why.reason in _OUTSIDE_DELETES:
            if record.outcome_detail:
                detail += f"; {record.outcome_detail}"
            return _finish(record, now, State.SUPERSEDED, why.reason, detail)
    if record.outcome_detail:
        detail += f"; {record.outcome_detail}"
    return _finish(record, now, State.ROLLED_BACK, Reason.ROLLBACK_DONE, detail)


# rolling_back --------------------------------------------------------------------------------


def _roll_back(
    record: OperationRecord,
    view: _View,
    policy: OperationPolicy,
    now: datetime,
    reason: Reason,
    detail: str,
    extra: tuple[Command, ...] = (),
) -> Step:
    """Delete the VMs this operation created (only those), and wait for them to be gone.

    Rolled back because someone else's update runs (`scale_set_busy`): a delete now would be
    refused as a conflict, so it is only recorded, and `_await_deletes` sends it once the
    update ended (or at the delete deadline).
    """
    ours = [i for i in view.new if i.id in record.created and not i.protected]
    deferred = view.busy and reason is Reason.SCALE_SET_BUSY
    to_delete = [] if deferred else [i.id for i in ours if not i.deleting]
    protected = [i.id for i in view.new if i.id in record.created and i.protected]
    record = replace(
        record,
        kept=(),
        discarded=tuple(i.id for i in ours),
        sources=(),
        delete_requested=MappingProxyType(dict.fromkeys((i.id for i in ours), now)),
        delete_deadline=_delete_deadline(view.scale_set, policy, now),
        delete_capacity=None if deferred else _after_deletes(view, to_delete),
        attempts=0 if deferred else 1,
        last_request_at=None if deferred else now,
    )
    if protected:
        listed = ", ".join(protected)
        record = replace(record, outcome_detail=f"not deleted (protected meanwhile): {listed}")
    if not ours:
        final = State.SUPERSEDED if reason in _OUTSIDE_DELETES else State.ROLLED_BACK
        return _finish(record, now, final, reason, detail or "nothing to remove", extra)
    commands = extra + _delete(view, to_delete)
    return _transition(record, State.ROLLING_BACK, now, reason, detail, commands)


# helpers -------------------------------------------------------------------------------------


def _stale(view: _View, policy: OperationPolicy, now: datetime) -> bool:
    """The observation began too long ago to delete a source on it."""
    return now - view.inventory.observed_at > policy.max_observation_age


def _delete_deadline(scale_set: ScaleSet, policy: OperationPolicy, now: datetime) -> datetime:
    return now + (scale_set.terminate_notification or timedelta(0)) + policy.delete_grace


def _sorted_ids(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(ids), key=lambda vm: (0, int(vm)) if vm.isdigit() else (1, vm)))


def _enter(
    record: OperationRecord, state: State, now: datetime, reason: Reason, detail: str
) -> OperationRecord:
    history = (*record.history, Transition(state, now, reason, detail))[-HISTORY_LIMIT:]
    changes: dict[str, Any] = {"state": state, "history": history}
    if state.terminal:
        changes |= {"outcome": reason, "outcome_detail": detail}
    return replace(record, **changes)


def _notify(record: OperationRecord) -> Notify:
    last = record.history[-1]
    text = f"{record.scale_set_id}: {last.reason.describe()}"
    if last.detail:
        text += f" ({last.detail})"
    return Notify(kind=f"operation.{record.state.value}", detail=text)


def _transition(
    record: OperationRecord,
    state: State,
    now: datetime,
    reason: Reason,
    detail: str,
    commands: tuple[Command, ...] = (),
    *,
    again: bool = False,
) -> Step:
    record = _enter(record, state, now, reason, detail)
    return Step(record, (*commands, _notify(record)), observe_again=again and not commands)


def _finish(
    record: OperationRecord,
    now: datetime,
    state: State,
    reason: Reason,
    detail: str,
    commands: tuple[Command, ...] = (),
) -> Step:
    return _transition(record, state, now, reason, detail, commands)


# --------------------------------------------------------------------------------------------
# JSON (schema 1). Times are ISO 8601 with their offset; everything round-trips exactly.


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def _encode_ids(ids: frozenset[str]) -> dict[str, Any]:
    """Baseline ids: a plain list when short, else zlib+base64 (a 1,000-VM set stays ~8 KB)."""
    ordered = _sorted_ids(ids)
    joined = "\n".join(ordered)
    if len(joined) <= _INLINE_BASELINE_CHARS:
        return {"ids": list(ordered)}
    packed = base64.b64encode(zlib.compress(joined.encode(), 9)).decode("ascii")
    return {"ids_zlib": packed, "count": len(ordered)}


def _decode_ids(doc: Mapping[str, Any]) -> frozenset[str]:
    if "ids" in doc:
        return frozenset(str(vm) for vm in doc["ids"])
    joined = zlib.decompress(base64.b64decode(doc["ids_zlib"])).decode()
    ids = frozenset(joined.split("\n")) if joined else frozenset()
    if len(ids) != doc["count"]:
        raise ValueError(f"baseline holds {len(ids)} ids, expected {doc['count']}")
    return ids


def _encode(record: OperationRecord) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "operation_id": record.operation_id,
        "scale_set_id": record.scale_set_id,
        "location": record.location,
        "sku": record.sku,
        "mode": record.mode.value,
        "state": record.state.value,
        "created_at": _time(record.created_at),
        "updated_at": _time(record.updated_at),
        "k": record.k,
        "moves": [[m.from_zone, m.to_zone, m.source] for m in record.moves],
        "moves_needed": record.moves_needed,
        "zone_needs": dict(record.zone_needs),
        "baseline": {
            "capacity": record.baseline.capacity,
            "healthy": record.baseline.healthy,
            "deleting": list(_sorted_ids(record.baseline.deleting)),
            **_encode_ids(record.baseline.instance_ids),
        },
        "target_capacity": record.target_capacity,
        "scale_out_confirmed": record.scale_out_confirmed,
        "created": dict(record.created),
        "kept": list(record.kept),
        "discarded": list(record.discarded),
        "sources": list(record.sources),
        "delete_requested": {vm: _time(at) for vm, at in record.delete_requested.items()},
        "scale_out_deadline": _time(record.scale_out_deadline),
        "health_deadline": _time(record.health_deadline),
        "delete_deadline": _time(record.delete_deadline),
        "attempts": record.attempts,
        "last_request_at": _time(record.last_request_at),
        "rejected": record.rejected,
        "cause_wait_since": _time(record.cause_wait_since),
        "delete_capacity": record.delete_capacity,
        "repaired": dict(record.repaired),
        "outcome": record.outcome.value if record.outcome else None,
        "outcome_detail": record.outcome_detail,
        "history": [[t.state.value, _time(t.at), t.reason.value, t.detail] for t in record.history],
        "arm_calls": list(record.arm_calls),
    }


def _decode(doc: Mapping[str, Any]) -> OperationRecord:
    baseline = doc["baseline"]
    return OperationRecord(
        operation_id=doc["operation_id"],
        scale_set_id=doc["scale_set_id"],
        location=doc["location"],
        sku=doc["sku"],
        mode=OrchestrationMode(doc["mode"]),
        state=State(doc["state"]),
        created_at=datetime.fromisoformat(doc["created_at"]),
        updated_at=datetime.fromisoformat(doc["updated_at"]),
        k=int(doc["k"]),
        moves=tuple(PlannedMove(*move) for move in doc["moves"]),
        moves_needed=int(doc["moves_needed"]),
        zone_needs=MappingProxyType({str(z): int(n) for z, n in doc["zone_needs"].items()}),
        baseline=Baseline(
            capacity=int(baseline["capacity"]),
            instance_ids=_decode_ids(baseline),
            healthy=int(baseline["healthy"]),
            deleting=frozenset(baseline.get("deleting", ())),
        ),
        target_capacity=int(doc["target_capacity"]),
        scale_out_confirmed=bool(doc["scale_out_confirmed"]),
        created=MappingProxyType(dict(doc["created"])),
        kept=tuple(doc["kept"]),
        discarded=tuple(doc["discarded"]),
        sources=tuple(doc["sources"]),
        delete_requested=MappingProxyType(
            {vm: datetime.fromisoformat(at) for vm, at in doc["delete_requested"].items()}
        ),
        scale_out_deadline=_parse_time(doc["scale_out_deadline"]),
        health_deadline=_parse_time(doc["health_deadline"]),
        delete_deadline=_parse_time(doc["delete_deadline"]),
        attempts=int(doc["attempts"]),
        last_request_at=_parse_time(doc.get("last_request_at")),
        rejected=doc["rejected"],
        cause_wait_since=_parse_time(doc.get("cause_wait_since")),
        delete_capacity=_optional_int(doc.get("delete_capacity")),
        repaired=MappingProxyType(dict(doc.get("repaired", {}))),
        outcome=Reason(doc["outcome"]) if doc["outcome"] else None,
        outcome_detail=doc["outcome_detail"],
        history=tuple(
            Transition(State(state), datetime.fromisoformat(at), Reason(reason), detail)
            for state, at, reason, detail in doc["history"]
        ),
        arm_calls=tuple(doc["arm_calls"]),
    )


# --------------------------------------------------------------------------------------------
# For `status`


def _until(deadline: datetime | None, now: datetime) -> str:
    if deadline is None:
        return ""
    minutes = int((deadline - now).total_seconds() // 60)
    when = deadline.strftime("%Y-%m-%d %H:%M UTC") if deadline.tzinfo else deadline.isoformat()
    left = f"{minutes} min left" if minutes >= 0 else f"{-minutes} min overdue"
    return f" until {when} ({left})"


def describe(record: OperationRecord, now: datetime) -> str:
    """One paragraph for a person: what the operation is doing and what it waits for."""
    head = (
        f"Operation {record.operation_id} on {record.ref.name}: {record.state.value}, "
        f"{record.k} of {record.moves_needed} move(s) into zone(s) "
        f"{', '.join(record.target_zones)}, capacity {record.baseline.capacity} -> "
        f"{record.target_capacity}."
    )
    created = ", ".join(f"{vm} (zone {zone})" for vm, zone in record.created.items())
    if record.state is State.PLANNED:
        body = "Planned; the scale-out has not been requested yet."
    elif record.state is State.SCALING_OUT:
        seen = "confirmed" if record.scale_out_confirmed else "not visible yet"
        body = (
            f"Capacity change {seen} (request {record.attempts}); waiting for the new VMs "
            f"to be placed and provisioned"
            f"{_until(record.scale_out_deadline, now)}. New VMs so far: {created or 'none'}."
        )
    elif record.state is State.AWAITING_HEALTH:
        body = (
            f"Waiting for new VM(s) {', '.join(record.kept)} to report healthy"
            f"{_until(record.health_deadline, now)}."
        )
        if record.discarded:
            body += f" To be removed with the sources: {', '.join(record.discarded)}."
    elif record.state is State.SCALING_IN and not record.delete_requested:
        body = (
            "New VMs are ready; the sources are chosen from a fresh observation and deleted "
            "at the next step."
        )
    elif record.state in (State.SCALING_IN, State.ROLLING_BACK):
        pending = ", ".join(_sorted_ids(record.delete_requested))
        body = (
            f"Deleting {pending or 'nothing'} (request {record.attempts}); waiting for them to "
            f"be gone{_until(record.delete_deadline, now)}."
        )
        if record.sources:
            body += f" Sources: {', '.join(record.sources)}; kept new: {', '.join(record.kept)}."
    else:
        reason = record.outcome.describe() if record.outcome else ""
        body = f"Ended at {record.updated_at.isoformat()}: {reason}"
        if record.outcome_detail:
            body += f" Detail: {record.outcome_detail}."
        if created:
            body += f" VMs created by it: {created}."
    if record.active and record.cause_wait_since is not None:
        body += (
            " VMs went missing with the capacity lower by as many; since "
            f"{record.cause_wait_since.isoformat()} it waits for the event that says whether "
            "someone deleted them (its VMs are then removed) or wrote the capacity (kept)."
        )
    return f"{head} {body}"
