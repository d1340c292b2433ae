"""The imperative shell: one scale set at a time, lock -> observe -> decide -> persist -> act.

`Reconciler.reconcile(ref)` is safe to call any number of times, concurrently, from any
trigger: the per-scale-set lock in Table Storage admits one actor, every decision is re-derived
from a fresh observation, and the record of each step is written *before* the Azure call that
performs it (see `rebalancer.operation`). Nothing here waits for Azure: a call is started, its
intent is on disk, and the next trigger (an event or the timer) looks at the result.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from rebalancer import autoscale, followup, gates, lro, protection
from rebalancer.clock import Clock
from rebalancer.compute.calls import ArmCall
from rebalancer.compute.errors import AdapterError, ErrorKind, ScaleSetGone
from rebalancer.deferred import Deferred
from rebalancer.evaluator import Assessment, Decision, assess, upcoming_spot
from rebalancer.model import Inventory, OrchestrationMode, OutsideActivity, ScaleSetRef
from rebalancer.settings import OPT_IN_TAG, Mode, OptIn, Settings
from rebalancer.store import Lock, LockLost, OperationRow, Store, StoreError
from rebalancer.sweep import Continuation, pages
from rebalancer.telemetry import Telemetry
from rebalancer.verdict import Gate, Outcome, Result, Verdict

if TYPE_CHECKING:
    from rebalancer import operation as op
    from rebalancer.compute import ComputeAdapter
else:  # the state machine comes with the first operation, not with an audit that plans none
    op = Deferred("rebalancer.operation")


class FollowUpSender(Protocol):
    def schedule(self, follow_up: followup.FollowUp | Continuation, now: datetime) -> None: ...


log = logging.getLogger("rebalancer")

AUDIT_MARKER = "subscription-audit"
"""Key of the row that remembers when the last full audit ran."""
NEXT_PAGE_ALLOWANCE = 2
"""An audit slice starts a page only if twice its longest page so far still ends before its
deadline: pages differ (a page's Flexible sets wait for the VM list's tighter budget), and
stopping early costs little, as a continuation starts the next slice at once."""
MAX_STEPS_PER_CALL = 6
"""Bound on `advance` rounds in one invocation (a round that needs no command may act at once)."""


@dataclass(frozen=True, slots=True)
class AuditSlice:
    """What one invocation did of the audit pass."""

    results: list[Result]
    done: bool
    """The pass is complete (False: the next timer tick continues it)."""
    busy: bool = False
    """Another invocation holds the audit, or a newer slice overtook the continuation this
    one was asked for; this one did none of it."""
    continuation: Continuation | None = None
    """The slice stopped because its invocation's time was up, with the pass not done: the
    message that continues it at once."""


@dataclass(frozen=True, slots=True)
class PageReads:
    """What the audit reads from Table Storage for a whole page, after its inventories: two
    queries a page instead of two point reads per scale set."""

    operations: frozenset[str]
    """Scale sets with an operation row (each is read again on its own, as before)."""
    fingerprints: Mapping[str, str]
    """The stored assessment's fingerprint, by scale set."""


@dataclass
class Reconciler:
    """Drives every scale set of one subscription. One per process; thread-safe."""

    settings: Settings
    store: Store
    compute: ComputeAdapter
    clock: Clock
    owner: str = field(default_factory=lambda: f"rebalancer-{uuid.uuid4().hex[:12]}")
    lease: timedelta = timedelta(minutes=5)
    new_operation_id: Callable[[], str] = field(default_factory=lambda: _operation_id)
    on_notify: Callable[[op.OperationRecord, op.Notify], None] | None = None
    telemetry: Telemetry = field(default_factory=Telemetry)
    follow_ups: FollowUpSender | None = None
    """Where an operation's follow-up chain starts (see `follow_up`); None: the timer only."""
    audit_page: int = 100
    """Scale sets per audit page: read together, then checkpointed."""
    audit_workers: int = 8
    """Scale sets of a page assessed at once (each pass mostly waits for Table Storage)."""

    @property
    def policy(self) -> op.OperationPolicy:
        return op.OperationPolicy(
            max_surge=self.settings.max_surge, health_timeout=self.settings.health_timeout
        )

    # -- one scale set --------------------------------------------------------------------

    def reconcile(
        self,
        ref: ScaleSetRef,
        *,
        observed: Inventory | None = None,
        page: PageReads | None = None,
    ) -> Result:
        """Bring one scale set one step closer to balance.

        An idle scale set is assessed without the lock, so a pass over a balanced fleet only
        reads. The lock is taken to act: to advance an in-flight operation, or to start one,
        and then the scale set is read again under it. `observed` (an inventory the audit read
        moments ago) is used to assess, never to act; so is `page` (what the audit read from
        the store for the page).
        """
        idle = page is not None and ref.key not in page.operations
        if idle or self.store.active_operation(ref.key) is None:
            inventory = observed if observed is not None else self._observe(ref)
            if inventory is None:
                return Result(ref, Outcome.GONE, detail="the scale set does not exist")
            verdict = self._verdict(inventory)
            if not _actionable(verdict):
                stored = page.fingerprints.get(ref.key) if page is not None else None
                self._record_verdict(verdict, stored=stored)
                return Result(ref, Outcome.ASSESSED, verdict=verdict, detail=verdict.detail)
        # One owner per pass, not per process: two invocations in one worker must exclude
        # each other too (the store renews a lock for the same owner).
        owner = f"{self.owner}/{uuid.uuid4().hex[:8]}"
        lock = self.store.try_acquire(ref.key, owner, self.clock.now(), self.lease)
        if lock is None:
            return Result(ref, Outcome.BUSY, detail="another invocation holds the lock")
        try:
            row = self.store.active_operation(ref.key)
            if row is not None:
                return self._advance(ref, row, lock)
            return self._evaluate(ref, lock)
        except LockLost as error:
            log.warning("lost the lock on %s: %s", ref, error, extra=_dims(ref))
            return Result(ref, Outcome.BUSY, detail=str(error))
        finally:
            self._release(lock)

    def _release(self, lock: Lock) -> None:
        try:
            self.store.release(lock)
        except StoreError as error:  # the lease expires on its own
            log.warning("could not release the lock on %s: %s", lock.scale_set_key, error)

    def _observe(self, ref: ScaleSetRef) -> Inventory | None:
        """A fresh inventory, or None when the scale set no longer exists."""
        try:
            return self.compute.read_inventory(ref, self.clock.now())
        except ScaleSetGone:
            return None

    # -- in-flight operation --------------------------------------------------------------

    def _advance(self, ref: ScaleSetRef, row: OperationRow, lock: Lock) -> Result:
        try:
            record = op.OperationRecord.from_json(row.body)
        except ValueError as error:
            # Another schema version or a hand edit: this scale set waits, the others go on.
            log.error(
                "operation %s on %s cannot be read (%s): nothing is done to this scale set "
                "until the row is fixed or removed (rebalancer status --scale-set shows it)",
                row.operation_id,
                ref,
                error,
                extra=_dims(ref, operation=row.operation_id),
            )
            return Result(ref, Outcome.STUCK, detail=f"unreadable operation record: {error}")
        self._repair_backoff(record)
        pending = _pending(row)
        activity = self.store.outside_activity(ref.key)
        seen: Inventory | None = None
        for round_ in range(MAX_STEPS_PER_CALL):
            # A round that acts at once on a state change (no command sent since) decides on
            # the observation just taken: it is seconds old, and another list of the scale
            # set would spend its per-scale-set read budget for nothing new.
            observation = seen if round_ > 0 and seen is not None else self._observe(ref)
            seen = observation
            if observation is None:
                self._confirm_gone(ref)
            if round_ == 0:  # after a read that went through: a throttled pass polls nothing
                pending = self._poll(ref, record, pending)
            stand_down = self._stand_down(ref, observation)
            now = self.clock.now()
            observation = lro.with_outcome(observation, record, pending)
            step = op.advance(
                record, observation, self.policy, now, stand_down=stand_down, activity=activity
            )
            step = self._known_protection(ref, record, observation, step, stand_down, activity, now)
            if pending is not None and pending.outcome is not None:
                step = replace(step, record=lro.reported(step.record, pending))
                pending = replace(pending, reported=True)
            if step.record != record or _call_json(pending) != row.call:
                row = replace(row, call=_call_json(pending))
                row, lock = self._persist(row, step.record, lock)
                self._log_step(record, step.record)
            record = step.record
            if step.commands:
                sent: list[lro.PendingCall] = []
                record = self._run(ref, record, step.commands, lock, sent)
                pending = sent[-1] if sent else pending
                if record != step.record or sent:  # call ids or a rejection to remember
                    row = replace(row, call=_call_json(pending))
                    row, lock = self._persist(row, record, lock)
            if not step.observe_again or record.state.terminal:
                break
        if record.state is op.State.SUCCEEDED:
            # The next move need not wait for the next audit: assess again under this lock,
            # from the observation that showed this one done.
            follow_up = self._evaluate(ref, lock, observed=seen)
            if follow_up.outcome is Outcome.STARTED:
                return follow_up
        return Result(ref, Outcome.ADVANCED, state=str(record.state), detail=record.outcome_detail)

    def _poll(
        self, ref: ScaleSetRef, record: op.OperationRecord, pending: lro.PendingCall | None
    ) -> lro.PendingCall | None:
        """Read the status of the operation's last write once, when it is due: never before
        the `Retry-After` the last answer gave, and never by waiting for it."""
        now = self.clock.now()
        if pending is None or not pending.due(now):
            return pending
        try:
            status = self.compute.operation_status(ArmCall.from_record(pending.call))
        except AdapterError as error:
            log.info("status of %s on %s unknown: %s", pending.action, ref, error)
            if error.kind is ErrorKind.INVALID:  # a status URL not to be sent a token
                return pending.ended(lro.CallOutcome("Unknown", error.code, error.message))
            return pending.still_running(now, error.retry_after)  # the next pass asks again
        if not status.done:
            return pending.still_running(now, status.retry_after)
        error = status.error
        gone = error is not None and error.kind is ErrorKind.NOT_FOUND
        outcome = lro.CallOutcome(
            status="Unknown" if gone else str(status.state),
            code=error.code if error is not None else None,
            message=(error.message if error is not None else "")[:1000],
            failed_instances=dict(status.failed_instances),
        )
        if outcome.failed:
            log.warning(
                "operation %s on %s: the %s request %s",
                record.operation_id,
                ref,
                pending.action,
                outcome.describe(),
                extra=_dims(ref, operation=record.operation_id, code=outcome.code or ""),
            )
        return pending.ended(outcome)

    def _confirm_gone(self, ref: ScaleSetRef) -> None:
        """Ask a second way before an operation ends because its scale set is gone.

        ARM can answer a GET of an existing resource with 404 now and then; ending the
        operation on that would abandon the VMs it created. The resource group's scale set
        list must agree; if it still shows the set, this pass is deferred (a transient error).
        """
        listed = self.compute.list_scale_sets([ref.resource_group])
        if any(scale_set.ref == ref for scale_set in listed):
            raise AdapterError(
                ErrorKind.TRANSIENT,
                "the scale set answered 404 but is still listed in its resource group; the "
                "next pass looks again",
                ref=ref,
            )

    def _known_protection(
        self,
        ref: ScaleSetRef,
        record: op.OperationRecord,
        observation: Inventory | None,
        step: op.Step,
        stand_down: str | None,
        activity: OutsideActivity,
        now: datetime,
    ) -> op.Step:
        """Decide again until no VM the step deletes is protected, for Flexible scale sets.

        A Flexible VM's instance protection is not in the VM list; the inventory reads it only
        for the sources a fresh plan would move. Sources re-chosen right before the delete (the
        set may already look balanced) and new VMs someone protected meanwhile would go out
        unchecked, and Azure does not stop a delete by id of a protected VM. So every VM a step
        would delete is read (one GET each) before the step is written; a protected one is
        marked so and the step decided again, which picks another source or keeps it.
        """
        if observation is None or observation.scale_set.mode is not OrchestrationMode.FLEXIBLE:
            return step
        known: dict[str, protection.Flags | None] = {}
        for _ in range(len(observation.instances) + 1):
            unread = protection.unread(_deleted_by(step), known)
            if not unread:
                return step
            for vm in unread:
                known[protection.key(vm)] = self.compute.read_protection(ref, vm)
            if not any(any(known[protection.key(vm)] or ()) for vm in unread):
                return step
            observation = protection.with_protection(observation, known)
            step = op.advance(
                record, observation, self.policy, now, stand_down=stand_down, activity=activity
            )
        raise RuntimeError(f"{ref}: no stable delete decision after reading VM protection")

    def _stand_down(self, ref: ScaleSetRef, observation: Inventory | None) -> str | None:
        if not self.settings.in_scope(ref.subscription_id, ref.resource_group):
            return f"resource group {ref.resource_group} is no longer in REBALANCER_RESOURCE_GROUPS"
        if self.settings.mode is not Mode.ENFORCE:
            return f"the app's mode is {self.settings.mode}"
        if observation is None:
            return None
        opt_in = self.settings.opt_in(observation.scale_set.tag(OPT_IN_TAG))
        if opt_in is not OptIn.ENABLED:
            return f"the scale set's opt-in is now {opt_in}"
        return None

    def _persist(
        self, row: OperationRow, record: op.OperationRecord, lock: Lock
    ) -> tuple[OperationRow, Lock]:
        updated = replace(
            row,
            state=str(record.state),
            active=record.active,
            updated_at=record.updated_at,
            body=record.to_json(),
        )
        return self.store.commit(updated, lock, self.clock.now())

    # -- idle scale set: assess, maybe start ----------------------------------------------

    def _evaluate(self, ref: ScaleSetRef, lock: Lock, observed: Inventory | None = None) -> Result:
        """Under the lock, with no operation in flight: read (unless `observed` was, under
        this lock), assess, start if allowed."""
        inventory = observed if observed is not None else self._observe(ref)
        if inventory is None:
            return Result(ref, Outcome.GONE, detail="the scale set does not exist")
        verdict = self._verdict(inventory)
        if _actionable(verdict):
            started = self._start(ref, inventory, verdict, lock)
            if started is not None:
                return started
            verdict = replace(
                verdict,
                gate=Gate.NO_SLOT,
                gate_detail=(
                    f"{self.settings.max_concurrent_operations} operations already run in "
                    "the subscription (REBALANCER_MAX_CONCURRENT_OPERATIONS); next pass"
                ),
            )
        self._record_verdict(verdict)
        return Result(ref, Outcome.ASSESSED, verdict=verdict, detail=verdict.detail)

    def _verdict(self, inventory: Inventory) -> Verdict:
        scale_set = inventory.scale_set
        assessment = assess(inventory)
        if scale_set.provisioning_state.lower() == "updating":
            # Someone else's update runs: would the set move once it ends? Then say so.
            settled = replace(
                inventory, scale_set=replace(scale_set, provisioning_state="Succeeded")
            )
            if assess(settled).decision is Decision.MOVE:
                assessment = assess(settled)
        opt_in = self.settings.opt_in(scale_set.tag(OPT_IN_TAG))
        verdict = Verdict(assessment, opt_in, instances=inventory.instances)
        if assessment.decision is not Decision.MOVE:
            return verdict
        gate = self._gate(inventory, assessment, opt_in)
        return replace(verdict, gate=gate[0], gate_detail=gate[1]) if gate else verdict

    def _gate(
        self, inventory: Inventory, assessment: Assessment, opt_in: OptIn
    ) -> gates.Held | None:
        """The first gate that holds the move (rebalancer/gates.py), cheapest checks first:
        each reads what it needs from the store or Azure only when the ones before let the
        move through."""
        settings, scale_set, now = self.settings, inventory.scale_set, self.clock.now()
        ref = scale_set.ref
        held = gates.opted_out(opt_in) or self._autoscale_gate(inventory, assessment, now)
        held = held or gates.not_allowed(opt_in, settings.mode, scale_set)
        if held is not None:
            return held
        last = self.store.last_activity(ref.key)
        held = self._silent_change(inventory, last, now) or gates.cooldown(
            last, settings.cooldown, now
        )
        if held is None and settings.min_move_interval > timedelta(0):
            previous = self.store.history(ref.key, limit=1)
            ended = previous[0].updated_at if previous else None
            held = gates.min_interval(ended, settings.min_move_interval, now)
        held = held or self._repeat_gate(inventory, assessment, now)
        if held is not None:
            return held
        k = min(len(assessment.moves), settings.max_surge)
        for zone in sorted({move.to_zone for move in assessment.moves[:k]}):
            until = self.store.backoff_until(
                scale_set.location, scale_set.sku_name or "", zone, now
            )
            held = gates.zone_backoff(scale_set, zone, until)
            if held is not None:
                return held
        return self._quota_gate(inventory, k) or self._rolling_upgrade_gate(inventory)

    def _rolling_upgrade_gate(self, inventory: Inventory) -> gates.Held | None:
        """Read last, and only when the upgrade policy can roll: one GET per scale set that
        would otherwise move."""
        scale_set = inventory.scale_set
        if not scale_set.can_roll:
            return None
        try:
            upgrade = self.compute.latest_rolling_upgrade(scale_set.ref)
        except AdapterError as error:
            # Unknown does not block: the VMs being reimaged are not active, so none is
            # chosen as a source, and a new VM is still awaited healthy before any delete.
            log.info(
                "rolling upgrade of %s unknown: %s",
                scale_set.ref,
                error,
                extra=_dims(scale_set.ref),
            )
            return None
        return gates.rolling_upgrade(scale_set, upgrade)

    def _silent_change(
        self, inventory: Inventory, last_activity: datetime | None, now: datetime
    ) -> gates.Held | None:
        """VMs changed since the last assessment, not by the app nor by an event it saw:
        recorded as outside activity now, so the cooldown runs as after an event."""
        ref = inventory.scale_set.ref
        stored = self.store.last_assessment(ref.key)
        if stored is None or (last_activity is not None and last_activity >= stored.at):
            return None  # nothing to compare with, or an event already started the cooldown
        try:
            before = json.loads(stored.body).get("instances")
        except ValueError:
            return None
        if not isinstance(before, list):
            return None  # stored by an earlier version
        current = {instance.id for instance in inventory.instances}
        if set(before) == current:
            return None
        ours = gates.apps_vms(self._records_since(ref, stored.at))
        held = gates.silent_change(before, current, ours, stored.at, self.settings.cooldown, now)
        if held is not None:
            self.store.record_activity(ref.key, now)
        return held

    def _records_since(self, ref: ScaleSetRef, since: datetime) -> Iterator[op.OperationRecord]:
        """The app's operations on the scale set that ended at or after `since`."""
        for row in self.store.history(ref.key):
            if row.updated_at < since:
                break
            try:
                yield op.OperationRecord.from_json(row.body)
            except ValueError:
                continue

    def _repeat_gate(
        self, inventory: Inventory, assessment: Assessment, now: datetime
    ) -> gates.Held | None:
        rows = self.store.history(inventory.scale_set.ref.key, limit=1)
        if not rows or rows[0].active:
            return None
        try:
            last = op.OperationRecord.from_json(rows[0].body)
        except ValueError:
            return None
        return gates.repeat(
            last, rows[0].updated_at, inventory, assessment, self.settings.cooldown, now
        )

    def _autoscale_gate(
        self, inventory: Inventory, assessment: Assessment, now: datetime
    ) -> gates.Held | None:
        scale_set = inventory.scale_set
        try:
            settings = self.compute.autoscale_settings()
        except AdapterError as error:
            # Unknown autoscale does not block: a move over its maximum is taken back by
            # autoscale and ends superseded with nothing deleted.
            log.info(
                "autoscale of %s unknown: %s", scale_set.ref, error, extra=_dims(scale_set.ref)
            )
            return None
        capacity = scale_set.capacity
        if capacity is None:
            capacity = sum(1 for instance in inventory.instances if instance.counts)
        k = min(len(assessment.moves), self.settings.max_surge)
        found = autoscale.at_maximum(settings, scale_set.ref, capacity, k, now)
        return (Gate.AUTOSCALE_AT_MAXIMUM, found.describe()) if found else None

    def _quota_gate(self, inventory: Inventory, k: int) -> gates.Held | None:
        """Room for the `k` new VMs in the quota each draws on: Spot VMs (a Spot set, or the
        Spot share of a priority mix) in lowPriorityCores, regular ones in the size's family."""
        scale_set = inventory.scale_set
        spot = sum(new_vms_spot(inventory, k))
        for is_spot, count in ((False, k - spot), (True, spot)):
            if count <= 0:
                continue
            try:
                quota = self.compute.quota(
                    scale_set.location, scale_set.sku_name or "", spot=is_spot
                )
            except AdapterError as error:
                # Unknown quota does not block: a scale-out over quota is rejected by Azure
                # before anything is created, and the operation ends `failed` with that reason.
                log.info(
                    "quota of %s unknown: %s", scale_set.ref, error, extra=_dims(scale_set.ref)
                )
                continue
            held = gates.quota(scale_set, quota, count, spot=is_spot)
            if held is not None:
                return held
        return None

    def _record_verdict(self, verdict: Verdict, *, stored: str | None = None) -> None:
        """Persist the verdict when it changed, and log it only then: no noise every tick.
        `stored`: the stored assessment's fingerprint, when the audit read it for the page."""
        body = verdict.to_json()
        changed = self.store.save_assessment(
            verdict.assessment.ref.key,
            body,
            self.clock.now(),
            imbalanced=not verdict.assessment.balanced,
            stored=stored,
        )
        if changed:
            a = verdict.assessment
            level = logging.INFO if a.balanced else logging.WARNING
            log.log(
                level,
                "%s: %s (%s) %s",
                a.ref,
                verdict.decision,
                verdict.reason,
                verdict.detail,
                extra=_dims(
                    a.ref,
                    decision=verdict.decision,
                    reason=verdict.reason,
                    zones={z: c.total for z, c in a.zones.items()},
                    balanced=a.balanced,
                ),
            )
            self.telemetry.assessment_changed(verdict, self.clock.now())

    def _start(
        self, ref: ScaleSetRef, inventory: Inventory, verdict: Verdict, lock: Lock
    ) -> Result | None:
        now = self.clock.now()
        record, commands = op.start(
            inventory, verdict.assessment, self.policy, now, self.new_operation_id()
        )
        row = OperationRow(
            operation_id=record.operation_id,
            scale_set_key=ref.key,
            state=str(record.state),
            active=record.active,
            updated_at=now,
            body=record.to_json(),
            created_at=now,
        )
        begun = self.store.begin_operation(
            row, lock, now, slot_limit=self.settings.max_concurrent_operations
        )
        if begun is None:
            return None
        row, lock = begun
        self._record_verdict(verdict)
        self._log_step(None, record)
        sent: list[lro.PendingCall] = []
        record = self._run(ref, record, commands, lock, sent)
        pending = sent[-1] if sent else None
        self._persist(replace(row, call=_call_json(pending)), record, lock)
        self._start_follow_ups(record, pending)
        return Result(ref, Outcome.STARTED, state=str(record.state), verdict=verdict)

    def _start_follow_ups(
        self, record: op.OperationRecord, pending: lro.PendingCall | None
    ) -> None:
        """Send the first follow-up of a new operation. If it cannot be sent, the timer tick
        still advances the operation (only slower), so this never fails the pass."""
        if self.follow_ups is None:
            return
        now = self.clock.now()
        due = followup.next_due(record, pending, now, self.settings.follow_up_interval)
        if due is None:
            return
        first = followup.FollowUp(record.scale_set_key, record.operation_id, 0, due)
        try:
            self.follow_ups.schedule(first, now)
        except Exception as error:  # the queue is an accelerator, the timer the fallback
            log.warning(
                "operation %s on %s: no follow-up scheduled (%s); the timer advances it",
                record.operation_id,
                record.scale_set_id,
                error,
                extra=_dims(record.ref, operation=record.operation_id),
            )

    # -- commands -------------------------------------------------------------------------

    def _run(
        self,
        ref: ScaleSetRef,
        record: op.OperationRecord,
        commands: Iterable[op.Command],
        lock: Lock,
        sent: list[lro.PendingCall] | None = None,
    ) -> op.OperationRecord:
        """Run the commands of a step whose record is already on disk.

        An Azure write is sent only while the lease of `lock` runs: a pass that stalled past
        it (another instance may have taken over and decided differently since) stops with
        LockLost instead of acting on what it saw before.
        """
        now = self.clock.now()
        for command in commands:
            writes = isinstance(command, op.SetCapacity | op.DeleteInstances)
            if writes and self.clock.now() >= lock.lease_until:
                raise LockLost(
                    f"the lease on {ref} ran out at {lock.lease_until.isoformat()} before "
                    f"{type(command).__name__} was sent: the lock is no longer held; the "
                    "next trigger decides again"
                )
            try:
                if isinstance(command, op.SetCapacity):
                    call = self.compute.set_capacity(ref, command.capacity, etag=command.etag)
                    record = record.with_arm_call(_call_id("set_capacity", call))
                    if sent is not None:
                        sent.append(lro.PendingCall(lro.SET_CAPACITY, call.to_record(), now))
                elif isinstance(command, op.DeleteInstances):
                    call = self.compute.delete_instances(
                        ref,
                        command.ids,
                        still_ours=lambda: self.clock.now() < lock.lease_until,
                        expect_capacity=command.capacity,
                    )
                    record = record.with_arm_call(_call_id("delete_instances", call))
                    if sent is not None:
                        sent.append(lro.PendingCall(lro.DELETE_INSTANCES, call.to_record(), now))
                elif isinstance(command, op.BackOffZone):
                    self._back_off(record, command, now)
                elif isinstance(command, op.ClearZoneBackoff):
                    self.store.clear_backoff(command.location, command.sku, command.zone)
                elif isinstance(command, op.Notify):
                    self._notify(record, command)
            except AdapterError as error:
                record = self._command_failed(record, command, error)
                if error.kind in (ErrorKind.THROTTLED, ErrorKind.TRANSIENT):
                    break  # the rest waits for the next pass, like this one
        return record

    def _back_off(self, record: op.OperationRecord, command: op.BackOffZone, now: datetime) -> None:
        """Count the zone's capacity failure once per rollback, however often this runs.

        A failure of the zone recorded at or after the rollback began (by this operation, or
        by another one: the zone is backed off either way) makes this a no-op, so a repeat
        after a crash does not double the backoff.
        """
        entered = _capacity_rollback(record)
        since = entered.at if entered is not None else now
        zone = (command.location.lower(), command.sku.lower(), command.zone)
        for known in self.store.backoffs(since):
            if (known.location, known.sku, known.zone) == zone and known.last_failure_at >= since:
                return
        backoff = self.store.record_capacity_failure(
            command.location, command.sku, command.zone, now
        )
        self.telemetry.zone_backed_off(record, backoff, now)

    def _repair_backoff(self, record: op.OperationRecord) -> None:
        """Record the backoff of a capacity rollback whose process died before it could.

        The rollback is persisted before its commands run (intent first), so a crash in
        between leaves a `rolling_back` record whose zone was never backed off; without this,
        the next audit would try the starved zone again at once.
        """
        entered = _capacity_rollback(record)
        if record.state is not op.State.ROLLING_BACK or entered is None:
            return
        # The rollback names only the zones that showed a shortage, and those are recorded
        # with it: any backoff of this size since the rollback began means it was not lost.
        # Only when none is there did the process die first; then every target zone waits
        # (the record does not say which were short), which delays but never harms.
        size = (record.location.lower(), record.sku.lower())
        if any(
            (b.location, b.sku) == size and b.last_failure_at >= entered.at
            for b in self.store.backoffs(entered.at)
        ):
            return
        now = self.clock.now()
        for zone in record.target_zones:
            reason = op.Reason.NO_CAPACITY_IN_TARGET_ZONE.value
            self._back_off(record, op.BackOffZone(record.location, record.sku, zone, reason), now)

    def _command_failed(
        self, record: op.OperationRecord, command: op.Command, error: AdapterError
    ) -> op.OperationRecord:
        log.warning(
            "operation %s on %s: %s failed: %s",
            record.operation_id,
            record.scale_set_id,
            type(command).__name__,
            error,
            extra=_dims(record.ref, operation=record.operation_id, error=str(error.kind)),
        )
        if error.kind is ErrorKind.THROTTLED:
            self.telemetry.throttled(record.scale_set_id, error.retry_after, type(command).__name__)
        if error.request_id:
            record = record.with_arm_call(f"failed:{error.request_id}")
        if isinstance(command, op.SetCapacity) and not error.retryable:
            if error.kind is ErrorKind.NO_CAPACITY:
                for zone in [error.zone] if error.zone else record.target_zones:
                    backoff = self.store.record_capacity_failure(
                        record.location, record.sku, zone, self.clock.now()
                    )
                    self.telemetry.zone_backed_off(record, backoff, self.clock.now())
            return op.scale_out_rejected(record, str(error), self.clock.now())
        return record

    def _notify(self, record: op.OperationRecord, command: op.Notify) -> None:
        log.info(
            "operation %s on %s: %s %s",
            record.operation_id,
            record.scale_set_id,
            command.kind,
            command.detail,
            extra=_dims(record.ref, operation=record.operation_id, event=command.kind),
        )
        if self.on_notify is not None:
            try:
                self.on_notify(record, command)
            except Exception:  # a notification never breaks an operation
                log.exception("publishing %s for %s failed", command.kind, record.operation_id)

    def _log_step(self, before: op.OperationRecord | None, after: op.OperationRecord) -> None:
        if before is not None and before.state is after.state:
            return
        self.telemetry.operation_changed(before, after)
        last = after.history[-1] if after.history else None
        log.info(
            "operation %s on %s: %s -> %s (%s) %s",
            after.operation_id,
            after.scale_set_id,
            before.state if before else "none",
            after.state,
            last.reason if last else "",
            last.detail if last else "",
            extra=_dims(
                after.ref,
                operation=after.operation_id,
                state=str(after.state),
                reason=str(last.reason) if last else "",
            ),
        )

    # -- follow-ups -----------------------------------------------------------------------

    def follow_up(self, message: followup.FollowUp) -> followup.FollowUp | None:
        """Look at an in-flight operation when its follow-up is due; return the next one.

        First the cheapest read that says whether the operation can move on (its new VMs'
        instance views while it waits for health, its own write's status while that runs);
        only then the scale set is read in full and the operation advanced. Returns None when
        the operation named has ended (a successor started by this pass has its own chain).
        """
        ref = ScaleSetRef.parse(message.scale_set_key)
        now = self.clock.now()
        interval = self.settings.follow_up_interval
        current = self._followed(message)
        if current is None:
            return None
        record, pending = current
        try:
            waiting, pending = self._still_waiting(ref, record, pending, now)
        except AdapterError as error:
            log.info("follow-up of %s: %s; looking again later", ref, error, extra=_dims(ref))
            retry = timedelta(seconds=error.retry_after or 0)
            due = followup.next_due(record, pending, now, max(interval, retry))
            return message.next(due) if due is not None else None
        if waiting:
            due = followup.next_due(record, pending, now, interval)
            return message.next(due) if due is not None else None
        self._guarded(ref)
        current = self._followed(message)
        if current is None:
            return None
        record, pending = current
        due = followup.next_due(record, pending, self.clock.now(), interval)
        return message.next(due) if due is not None else None

    def _followed(
        self, message: followup.FollowUp
    ) -> tuple[op.OperationRecord, lro.PendingCall | None] | None:
        row = self.store.active_operation(message.scale_set_key)
        if row is None or row.operation_id != message.operation_id:
            return None
        try:
            return op.OperationRecord.from_json(row.body), _pending(row)
        except ValueError:
            return None  # the next pass logs it and stands still (`Outcome.STUCK`)

    def _still_waiting(
        self,
        ref: ScaleSetRef,
        record: op.OperationRecord,
        pending: lro.PendingCall | None,
        now: datetime,
    ) -> tuple[bool, lro.PendingCall | None]:
        """Whether a cheap read says nothing can change yet (and the pending call with its
        next poll time); False: read the scale set in full and advance the operation now."""
        check = followup.check_for(record, pending)
        if check is followup.Check.HEALTH:
            if record.health_deadline is not None and now >= record.health_deadline:
                return False, pending
            health = self.compute.vm_health(ref, record.mode, record.kept)
            return not followup.all_healthy(dict(health), record.kept), pending
        if check is followup.Check.WRITE:
            assert pending is not None
            if not pending.due(now):
                return True, pending
            status = self.compute.operation_status(ArmCall.from_record(pending.call))
            if status.done:
                return False, pending
            return True, pending.still_running(now, status.retry_after)
        return False, pending

    # -- the subscription -----------------------------------------------------------------

    def advance_all(self) -> list[Result]:
        """Move every in-flight operation of the subscription one step (the timer's job)."""
        results = []
        for row in self.store.active_operations():
            results.append(self._guarded(ScaleSetRef.parse(row.scale_set_key)))
        return results

    def audit(self, deadline: datetime | None = None) -> list[Result]:
        """Assess every zonal scale set in scope; start moves where the rules allow.

        With a `deadline`, only as much of the pass as fits before it (see `audit_slice`)."""
        return self.audit_slice(deadline).results

    def audit_slice(
        self, deadline: datetime | None = None, continuing: Continuation | None = None
    ) -> AuditSlice:
        """Continue the audit pass (or start the next one) from its checkpoint, a page of
        scale sets at a time, until the pass is done or the next page would not end before
        `deadline`. The checkpoint is written after every page, under the audit's lease: one
        invocation at a time works on the audit, and a crash loses at most the page in hand.

        With `continuing`, only the pass that message continues, and only if no other slice
        ran since it was sent (else this does nothing: never a new pass, never a second chain).
        """
        now = self.clock.now()
        owner = f"{self.owner}/{uuid.uuid4().hex[:8]}"
        held = self.store.take_audit(
            owner, now, self.lease, empty=lambda: self._legacy_sweep().to_json()
        )
        if held is None:
            log.info("audit: another invocation is running it; this one leaves it alone")
            return AuditSlice([], done=False, busy=True)
        try:
            sweep = self._stored_sweep(held.body)
            if continuing is not None and not sweep.continued_by(continuing):
                log.info("audit: %s is stale (the pass went on, or ended)", continuing.label)
                self._give_up_audit(held)
                return AuditSlice([], done=sweep.done, busy=True)
            if sweep.done:
                sweep = sweep.begin(now)
            sweep = sweep.sliced()
            try:
                self.compute.autoscale_settings(fresh=True)  # once per slice; the passes reuse it
            except AdapterError as error:
                log.warning("autoscale settings not read: %s; moves are not held to them", error)
            listed = {
                s.ref.key: s
                for s in self.compute.list_scale_sets(self.settings.resource_groups or None)
            }
            todo = sweep.remaining(listed)
            results: list[Result] = []
            longest = timedelta(0)
            stopped = ""
            out_of_time = False
            batches = pages(todo, self.audit_page) or [[]]
            for index, page in enumerate(batches):
                began = self.clock.now()
                if deadline is not None and (
                    began >= deadline
                    or (index > 0 and began + NEXT_PAGE_ALLOWANCE * longest >= deadline)
                ):
                    stopped = f"the invocation's time is up at {deadline.isoformat()}"
                    out_of_time = True
                    break
                page_results, throttled = self._audit_page([listed[key] for key in page], began)
                done_keys = [r.ref.key for r in page_results]
                if done_keys:
                    sweep = sweep.after_page(done_keys[-1], *_page_counts(page_results))
                if index == len(batches) - 1 and not throttled:
                    sweep = sweep.finish(self.clock.now())
                try:
                    held = self.store.save_audit(
                        held, sweep.to_json(), self.clock.now(), None if sweep.done else self.lease
                    )
                except LockLost as error:
                    log.warning("audit stopped: %s", error)
                    return AuditSlice(results, done=False)
                results += page_results
                longest = max(longest, self.clock.now() - began)
                if throttled:
                    stopped = f"Compute throttled the audit: {throttled}"
                    break
            continuation = None
            if not sweep.done:
                self.store.save_audit(held, sweep.to_json(), self.clock.now(), None)
                if out_of_time:
                    continuation = sweep.continuation(self.clock.now())
                log.info(
                    "audit paused after %s (%d of this pass's scale sets assessed so far): %s; "
                    "%s continues from this checkpoint",
                    sweep.cursor,
                    sweep.assessed,
                    stopped or "nothing left to read now",
                    "a continuation at once, else the next timer tick,"
                    if out_of_time
                    else "the next timer tick",
                )
            else:
                self._pass_done(sweep)
            now = self.clock.now()
            self.telemetry.audited(
                results,
                self._imbalanced_since(results),
                now,
                totals=(sweep.assessed, sweep.imbalanced),
                gauges=sweep.done,
            )
            return AuditSlice(results, done=sweep.done, continuation=continuation)
        except Exception:
            self._give_up_audit(held)
            raise

    def _audit_page(self, scale_sets: list[Any], now: datetime) -> tuple[list[Result], str]:
        """Read and assess one page. Stops at the first scale set Compute throttled (it and
        the rest are the next slice's), so throttling never makes the pass skip a set."""
        items = self.compute.read_inventories(scale_sets, now)
        throttled = ""
        for scale_set, item in zip(scale_sets, items, strict=True):
            if isinstance(item, AdapterError) and item.kind is ErrorKind.THROTTLED:
                self.telemetry.throttled(scale_set.ref.id, item.retry_after, "audit")
                throttled = str(item)
                cut = items.index(item)
                scale_sets, items = scale_sets[:cut], items[:cut]
                break

        if not scale_sets:
            return [], throttled
        # Read after the inventories, as each scale set's point reads were.
        page = PageReads(
            operations=self.store.operation_keys(),
            fingerprints=self.store.assessment_fingerprints([s.ref.key for s in scale_sets]),
        )

        def assess(scale_set: Any, item: Inventory | AdapterError) -> Result:
            if isinstance(item, AdapterError):
                return Result(scale_set.ref, Outcome.DEFERRED, detail=str(item))
            return _slim(self._guarded(scale_set.ref, observed=item, page=page))

        # Concurrently: what each pass waits for is Table Storage, one scale set at a time.
        workers = min(self.audit_workers, len(scale_sets))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="assess") as pool:
            return list(pool.map(assess, scale_sets, items)), throttled

    def _give_up_audit(self, held: Any) -> None:
        """A slice that failed (Azure or Table Storage unavailable) frees the audit at once,
        keeping the last checkpoint, so the next tick need not wait for the lease to run out."""
        try:
            self.store.save_audit(held, held.body, self.clock.now(), None)
        except StoreError as error:
            log.warning("could not free the audit after a failure: %s", error)

    def _pass_done(self, sweep: Any) -> None:
        took = sweep.duration()
        not_assessed = ", ".join(
            f"{n} {reason}" for reason, n in sorted(sweep.not_assessed.items())
        )
        log.info(
            "audit pass done: %d scale set(s) assessed in %d invocation(s) over %s%s",
            sweep.assessed,
            sweep.slices,
            took,
            f"; not assessed: {not_assessed}" if not_assessed else "",
        )
        if took is not None and took > self.settings.audit_interval:
            log.warning(
                "audit pass took %s, longer than REBALANCER_AUDIT_INTERVAL_MINUTES (%s) "
                "(reason audit_slower_than_interval): every scale set is still assessed once "
                "per pass, the next pass starts at once; Compute's throttling budget "
                "(REBALANCER_ARM_BUDGET_SHARE) bounds how fast the subscription can be read",
                took,
                self.settings.audit_interval,
            )

    def _stored_sweep(self, body: str) -> Any:
        from rebalancer.sweep import Sweep

        try:
            return Sweep.from_json(body)
        except ValueError as error:
            log.warning("audit checkpoint unreadable (%s): a new pass starts", error)
            return Sweep()

    def _legacy_sweep(self) -> Any:
        """The sweep a store without a checkpoint starts from: the last audit's time from the
        marker row earlier versions wrote, so an upgrade keeps the audit's spacing."""
        from rebalancer.sweep import Sweep

        marker = self.store.last_assessment(AUDIT_MARKER)
        return Sweep(started_at=marker.at if marker is not None else None)

    def _imbalanced_since(self, results: list[Result]) -> dict[str, datetime]:
        """When each scale set found out of balance turned so (one read per such set)."""
        since: dict[str, datetime] = {}
        for result in results:
            if result.verdict is None or result.verdict.assessment.balanced:
                continue
            try:
                stored = self.store.last_assessment(result.ref.key)
            except StoreError as error:
                log.warning("could not read the assessment of %s: %s", result.ref, error)
                continue
            if stored is not None and stored.imbalanced_since is not None:
                since[result.ref.key] = stored.imbalanced_since
        return since

    def audit_due(self) -> bool:
        """A pass in progress continues on every tick; a new one starts once the last one
        started an audit interval ago."""
        held = self.store.audit_checkpoint()
        sweep = self._stored_sweep(held.body) if held is not None else self._legacy_sweep()
        return sweep.due(self.clock.now(), self.settings.audit_interval)

    def _guarded(
        self, ref: ScaleSetRef, observed: Inventory | None = None, page: PageReads | None = None
    ) -> Result:
        """One scale set's failure (throttling, a transient error) never stops the pass."""
        try:
            return self.reconcile(ref, observed=observed, page=page)
        except AdapterError as error:
            log.warning("%s deferred: %s", ref, error, extra=_dims(ref, error=str(error.kind)))
            if error.kind is ErrorKind.THROTTLED:
                self.telemetry.throttled(ref.id, error.retry_after, "reconcile")
            return Result(ref, Outcome.DEFERRED, detail=str(error))


def _pending(row: OperationRow) -> lro.PendingCall | None:
    """The operation's last write as stored beside it; an unreadable one is dropped (the
    operation goes on from what it observes, as before the write's outcome was kept)."""
    if not row.call:
        return None
    try:
        return lro.PendingCall.from_json(row.call)
    except (ValueError, KeyError, TypeError) as error:
        log.warning("operation %s: its last write cannot be read: %s", row.operation_id, error)
        return None


def _call_json(pending: lro.PendingCall | None) -> str | None:
    return pending.to_json() if pending is not None else None


def _deleted_by(step: op.Step) -> list[str]:
    return [vm for c in step.commands if isinstance(c, op.DeleteInstances) for vm in c.ids]


def _capacity_rollback(record: op.OperationRecord) -> op.Transition | None:
    """The history entry of the record's latest rollback for want of zone capacity."""
    reason = op.Reason.NO_CAPACITY_IN_TARGET_ZONE
    entries = [t for t in record.history if t.reason is reason]
    return entries[-1] if entries else None


def new_vms_spot(inventory: Inventory, k: int) -> tuple[bool, ...]:
    """Whether each of the `k` VMs a move creates is Spot: all of a Spot set's, or as the
    priority mix splits them."""
    upcoming = upcoming_spot(inventory.scale_set, inventory.instances, k)
    return upcoming if upcoming is not None else (inventory.scale_set.spot,) * k


def _slim(result: Result) -> Result:
    """The result without the VMs its verdict assessed (kept only to store the assessment),
    so a slice over thousands of scale sets holds no inventory."""
    if result.verdict is None or not result.verdict.instances:
        return result
    return replace(result, verdict=replace(result.verdict, instances=()))


def _page_counts(results: list[Result]) -> tuple[int, int, dict[str, int]]:
    """(assessed, out of balance, not assessed by reason) of one page."""
    assessed = imbalanced = 0
    missed: dict[str, int] = {}
    for result in results:
        if result.verdict is not None or result.outcome is Outcome.ADVANCED:
            assessed += 1
            imbalanced += result.verdict is not None and not result.verdict.assessment.balanced
        else:
            missed[str(result.outcome)] = missed.get(str(result.outcome), 0) + 1
    return assessed, imbalanced, missed


def _actionable(verdict: Verdict) -> bool:
    return verdict.gate is None and verdict.assessment.decision is Decision.MOVE


def _operation_id() -> str:
    return uuid.uuid4().hex


def _call_id(action: str, call: Any) -> str:
    ids = [i for i in (call.request_id, call.correlation_id) if i]
    return f"{action}:{'/'.join(ids) or 'no-request-id'}"


def _dims(ref: ScaleSetRef, **values: Any) -> dict[str, Any]:
    """`custom_dimensions` as the Functions host ships them to Application Insights."""
    return {"custom_dimensions": {"scaleSetId": ref.id, **values}}
