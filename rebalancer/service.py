"""What the Functions triggers do, independent of the Functions host.

`function_app.py` only decodes the trigger input and calls `handle_event` / `handle_timer`.
`build_runtime` is the one wiring of the app's parts (settings, store, Compute adapter,
notifier, clock) into a `Runtime`. In Azure the parts come from the app settings
(`runtime_from_settings`), once per process on first use, so importing the app stays cheap.
The dev kit's host driver (devkit/host.py) runs an invocation on a runtime of its own parts
with `serving(runtime)`, which holds only for the calling thread's invocation.

Failure policy, as Event Grid and the timer expect it:
- a transient failure (Table Storage or ARM unavailable, throttled) of an event raises, so Event
  Grid delivers the event again later (an event is marked as handled only once it was);
- everything permanent (a malformed or irrelevant event, a bad setting, a missing scale set,
  a forbidden call) is logged once with its reason and acknowledged;
- the timer never raises for one scale set's trouble: the next tick tries again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from rebalancer.clock import Clock, SystemClock
from rebalancer.compute.errors import AdapterError
from rebalancer.settings import Mode, Settings, SettingsError, load_settings
from rebalancer.store import (
    StorageConnection,
    Store,
    StoreError,
    StoreUnavailable,
    parse_connection,
    storage_credential,
)
from rebalancer.verdict import Outcome, Result

if TYPE_CHECKING:
    from rebalancer.compute import ComputeAdapter
    from rebalancer.events import Trigger
    from rebalancer.model import ScaleSetRef
    from rebalancer.notify import EventGridNotifier
    from rebalancer.reconciler import AuditSlice, FollowUpSender, Reconciler

log = logging.getLogger("rebalancer")


class TransientFailure(RuntimeError):
    """Raised out of a trigger so that the platform retries the invocation later."""


@dataclass
class Runtime:
    settings: Settings
    store: Store
    reconciler: Reconciler
    clock: Clock
    follow_ups: FollowUpSender | None = None
    """The follow-up queue (None: in-flight operations move on timer ticks and events only)."""


def build_runtime(
    settings: Settings,
    *,
    store: Store,
    compute: ComputeAdapter,
    clock: Clock,
    notifier: EventGridNotifier | None = None,
    follow_ups: FollowUpSender | None = None,
) -> Runtime:
    """The app's wiring: the reconciler over the store and the Compute adapter, with
    telemetry, (with a topic) lifecycle notifications and (with a queue) follow-ups of
    in-flight operations. Azure, the tests, the chaos suite, the benchmarks and the demo
    all build their runtime here, from their own parts."""
    from rebalancer.reconciler import Reconciler
    from rebalancer.telemetry import Telemetry

    reconciler = Reconciler(
        settings=settings,
        store=store,
        compute=compute,
        clock=clock,
        on_notify=notifier,
        telemetry=Telemetry(notifier=notifier),
        follow_ups=follow_ups,
    )
    return Runtime(settings, store, reconciler, clock, follow_ups)


def runtime_from_settings(env: Mapping[str, str]) -> Runtime:
    """The parts as deployed: app settings -> store, Compute adapter (managed identity),
    notifier when a topic is set, the system clock."""
    from rebalancer.compute import ArmConfig, ComputeAdapter
    from rebalancer.compute.credentials import DeferredCredential
    from rebalancer.follow_up_queue import FollowUpQueue
    from rebalancer.telemetry import flatten_dimensions

    flatten_dimensions()
    settings = replace(load_settings(env), function_timeout=_host_function_timeout())
    library_log_level(settings.sdk_log_level)
    connection = parse_connection(env)
    credential = storage_credential(connection)
    store = Store(connection, table_prefix=settings.table_prefix, credential=credential)
    shared = credential if _one_identity(connection, env) else DeferredCredential()
    compute = ComputeAdapter(ArmConfig.from_settings(settings), credential=shared)
    follow_ups = FollowUpQueue.from_connection(
        settings.follow_up_queue, connection, env, credential=credential
    )
    notifier = None
    if settings.notify_topic_endpoint:  # without a topic, the notifier is never imported
        from rebalancer.notify import EventGridNotifier

        notifier = EventGridNotifier(settings.notify_topic_endpoint, credential=shared)
    return build_runtime(
        settings,
        store=store,
        compute=compute,
        clock=SystemClock(),
        notifier=notifier,
        follow_ups=follow_ups,
    )


LIBRARY_LOGGERS = ("azure", "msal", "urllib3")
"""The libraries' loggers `REBALANCER_SDK_LOG_LEVEL` sets: azure-core's HTTP logging (every
request and answer at INFO), azure-identity, msal, urllib3 (every connection at DEBUG)."""


def library_log_level(level: str) -> None:
    """Set the libraries' loggers to `level` (a name, as `REBALANCER_SDK_LOG_LEVEL`). The
    Functions worker sets the root logger to INFO and sends every record to the host."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def _host_function_timeout() -> timedelta | None:
    """The invocation time limit of the deployed app: host.json beside function_app.py."""
    from pathlib import Path

    from rebalancer.settings import function_timeout

    path = Path(__file__).resolve().parent.parent / "host.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return function_timeout("{}", str(path))  # the plan's default
    return function_timeout(text, str(path))


AUDIT_MARGIN = 0.1
"""The audit stops this share of the invocation's time limit before the limit, so the
checkpoint, the rest of the tick and the host's own work fit in."""


_SERVICE_PRINCIPAL_SETTINGS = (
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_USERNAME",
    "AZURE_FEDERATED_TOKEN_FILE",
)


def _one_identity(connection: StorageConnection, env: Mapping[str, str]) -> bool:
    """Whether Table Storage's identity is the one DefaultAzureCredential picks for Compute
    and Event Grid; then the three share one credential (one token cache, one client of the
    identity endpoint). Otherwise Compute and Event Grid share one `DeferredCredential`.

    DefaultAzureCredential takes a service principal or workload identity from the
    environment before a managed identity, and the managed identity `AZURE_CLIENT_ID` names."""
    if not connection.identity_based:
        return False
    if connection.client_id != (env.get("AZURE_CLIENT_ID") or None):
        return False
    if not connection.managed_identity:
        return True  # DefaultAzureCredential for the same managed identity: the same chain
    return not any(env.get(name) for name in _SERVICE_PRINCIPAL_SETTINGS)


_serving: ContextVar[Runtime | None] = ContextVar("rebalancer_runtime", default=None)
"""The runtime of the current invocation, when the caller gave one (`serving`)."""


@contextmanager
def serving(runtime: Runtime) -> Iterator[Runtime]:
    """Run this thread's invocations inside the block on `runtime` instead of the one
    built from the app settings (the dev kit's host driver; each thread its own)."""
    token = _serving.set(runtime)
    try:
        yield runtime
    finally:
        _serving.reset(token)


class _FromAppSettings:
    """The process's runtime in Azure: built from the app settings on first use, once; an
    invalid setting is remembered and logged on every invocation."""

    def __init__(self) -> None:
        self._runtime: Runtime | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def get(self) -> Runtime | None:
        with self._lock:
            if self._runtime is None and self._error is None:
                try:
                    self._runtime = runtime_from_settings(os.environ)
                except (SettingsError, ValueError) as error:
                    self._error = str(error)
            if self._runtime is None:
                log.error("the rebalancer refuses to act: %s", self._error)
            return self._runtime

    def forget(self) -> None:
        """Read the app settings again on the next invocation (tests that change them)."""
        with self._lock:
            self._runtime, self._error = None, None


_from_app_settings = _FromAppSettings()
forget_app_settings = _from_app_settings.forget


def runtime() -> Runtime | None:
    """The invocation's runtime: the one being served, else the process's from the app
    settings; None when the settings are invalid."""
    return _serving.get() or _from_app_settings.get()


# -- Event Grid -------------------------------------------------------------------------


def handle_event(
    event_id: Any, event_type: Any, subject: Any, event_time: Any, data: Any
) -> Result | None:
    """One Event Grid event: classify, de-duplicate, note outside activity, reconcile."""
    from rebalancer.events import Ignored, classify

    rt = runtime()
    if rt is None or rt.settings.mode is Mode.OFF:
        return None
    verdict = classify(event_id, event_type, subject, event_time, data, rt.settings)
    if isinstance(verdict, Ignored):
        log.info("event %s ignored: %s", verdict.event_id, verdict.reason)
        return None
    return _transient_guard(rt, verdict.event_id, lambda: _handle_trigger(rt, verdict))


def _handle_trigger(rt: Runtime, trigger: Trigger) -> Result | None:
    """Handle an event once. It is marked as handled only after the work is done, so a
    delivery that fails half-way is not taken for a duplicate when Event Grid retries it;
    two deliveries racing each other are harmless (the reconcile pass is locked and
    idempotent)."""
    now = rt.clock.now()
    if rt.store.event_seen(trigger.dedupe_key, now):
        log.info("event %s ignored: already handled (duplicate delivery)", trigger.event_id)
        return None
    result = None
    ref = trigger.ref
    if ref is None and trigger.flexible_vm is not None:
        ref = _flexible_vm_scale_set(rt, trigger)
    if ref is None:
        log.info(
            "event %s: VM %s names no scale set; the next audit will see its effect",
            trigger.event_id,
            trigger.flexible_vm,
        )
    else:
        if trigger.outside:
            rt.store.record_activity(ref.key, trigger.activity_at(now), trigger.size_change)
        result = rt.reconciler.reconcile(ref)
        log.info(
            "event %s (%s by %s) on %s: %s %s",
            trigger.event_id,
            trigger.operation_name,
            "someone else" if trigger.outside else "the rebalancer",
            ref,
            result.outcome,
            result.state or result.detail,
        )
    _mark_handled(rt, trigger.dedupe_key, now, result)
    return result


def _flexible_vm_scale_set(rt: Runtime, trigger: Trigger) -> ScaleSetRef | None:
    """The scale set a VM whose name does not carry one belongs to, by its own
    `virtualMachineScaleSet` reference (a VM created by hand and attached to a Flexible set).
    None when the VM is gone (a delete: the next audit sees it) or is standalone."""
    vm = trigger.flexible_vm or ""
    ref = rt.reconciler.compute.vm_scale_set(trigger.resource_group, vm)
    if ref is not None and not rt.settings.in_scope(ref.subscription_id, ref.resource_group):
        log.info("event %s: VM %s belongs to %s, outside the scope", trigger.event_id, vm, ref)
        return None
    return ref


def _mark_handled(rt: Runtime, event_id: str, now: datetime, result: Result | None) -> None:

    if result is not None and result.outcome is Outcome.DEFERRED:
        return  # raised as a transient failure next: the retry must get through
    try:
        rt.store.first_delivery(event_id, now)
    except StoreError as error:
        log.warning(
            "event %s was handled but could not be marked (%s); a duplicate delivery would "
            "look again, which changes nothing",
            event_id,
            error,
        )


def _transient_guard(rt: Runtime, event_id: str, action: Callable[[], Any]) -> Any:
    """Run the action; make transient failures retryable and permanent ones logged."""

    try:
        result = action()
    except StoreUnavailable as error:
        raise TransientFailure(f"Table Storage unavailable: {error}") from error
    except AdapterError as error:
        if error.retryable:
            raise TransientFailure(f"Azure Compute: {error}") from error
        log.error("event %s: %s; not retried", event_id, error)
        return None
    except ValueError as error:
        # Nothing a redelivery could change (a name or key the store cannot take): raising
        # would make Event Grid retry it for a day and then dead-letter it.
        log.error("event %s cannot be handled: %s; acknowledged, not retried", event_id, error)
        return None

    if getattr(result, "outcome", None) is Outcome.DEFERRED:
        raise TransientFailure(f"event {event_id} deferred: {result.detail}")
    return result


# -- follow-ups -------------------------------------------------------------------------


def handle_follow_up(body: str) -> bool | None:
    """One follow-up message of an in-flight operation (the queue trigger).

    Handled once per chain position: a message seen before (a redelivery, or a copy sent
    twice after a crash between sending the next one and finishing this one) is dropped,
    so a chain never splits. The next follow-up is sent before this one is marked handled;
    if it cannot be sent, this raises and the host delivers this message again.
    Returns whether the operation is still followed; None when nothing was done.
    """
    from rebalancer.follow_up_queue import FollowUpQueueError
    from rebalancer.followup import FollowUp
    from rebalancer.sweep import Continuation

    rt = runtime()
    if rt is None or rt.settings.mode is Mode.OFF:
        return None
    if Continuation.names(body):
        return _continue_audit(rt, body)
    try:
        message = FollowUp.from_json(body)
    except ValueError as error:
        log.error("follow-up dropped: %s; the timer tick still advances operations", error)
        return None
    now = rt.clock.now()
    try:
        if rt.store.event_seen(message.dedupe_key, now):
            log.info("%s ignored: already handled", message.dedupe_key)
            return None
        following = rt.reconciler.follow_up(message)
        if following is not None and rt.follow_ups is not None:
            rt.follow_ups.schedule(following, rt.clock.now())
        rt.store.first_delivery(message.dedupe_key, now)
    except StoreUnavailable as error:
        raise TransientFailure(f"Table Storage unavailable: {error}") from error
    except FollowUpQueueError as error:
        raise TransientFailure(str(error)) from error
    except (StoreError, AdapterError) as error:
        log.error("follow-up %s stopped: %s; the timer tick advances it", message.dedupe_key, error)
        return None
    return following is not None


def _continue_audit(rt: Runtime, body: str) -> bool | None:
    """The next slice of an audit pass whose last slice ran out of time. Any failure is
    logged, not retried by the host: the next timer tick continues from the checkpoint.
    Returns whether the pass goes on in another continuation; None when nothing was done."""
    from rebalancer.sweep import Continuation

    try:
        message = Continuation.from_json(body)
    except ValueError as error:
        log.error("%s; dropped, the next timer tick continues the audit", error)
        return None
    try:
        audit = rt.reconciler.audit_slice(_deadline(rt), continuing=message)
        if audit.busy:
            return None
        if audit.done:
            rt.store.purge(rt.clock.now(), rt.settings.history_retention)
    except (StoreError, AdapterError) as error:
        log.error("audit continuation stopped: %s; the next timer tick continues it", error)
        return None
    log.info("audit continued: %d scale set(s) audited", len(audit.results))
    return _send_continuation(rt, audit)


def _send_continuation(rt: Runtime, audit: AuditSlice | None) -> bool:
    """Continue a slice that ran out of time at once, on the follow-up queue, rather than
    at the next timer tick (which still does, should the message be lost)."""
    if audit is None or audit.continuation is None or rt.follow_ups is None:
        return False
    from rebalancer.follow_up_queue import FollowUpQueueError

    try:
        rt.follow_ups.schedule(audit.continuation, rt.clock.now())
    except FollowUpQueueError as error:
        log.warning("%s; the next timer tick continues the audit", error)
        return False
    return True


def _deadline(rt: Runtime) -> datetime | None:
    """When an audit slice started now stops: short of the invocation limit by the margin."""
    limit = rt.settings.function_timeout
    return rt.clock.now() + limit * (1 - AUDIT_MARGIN) if limit is not None else None


# -- timer ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TickReport:
    advanced: int
    audited: int
    deferred: int


def handle_timer(past_due: bool = False) -> TickReport | None:
    """One timer tick: advance in-flight operations; audit when due; clean up after audits."""

    rt = runtime()
    if rt is None or rt.settings.mode is Mode.OFF:
        return None
    deadline = _deadline(rt)
    if past_due:
        log.info("timer tick is past due; catching up with one pass")
    try:
        advanced = rt.reconciler.advance_all()
        audit = rt.reconciler.audit_slice(deadline) if rt.reconciler.audit_due() else None
        audited = audit.results if audit is not None else []
        if audit is not None and audit.done:
            rt.store.purge(rt.clock.now(), rt.settings.history_retention)
        _send_continuation(rt, audit)
    except StoreError as error:
        log.error("timer tick stopped: Table Storage: %s; the next tick tries again", error)
        return None
    except AdapterError as error:
        # One scale set's trouble is handled per scale set; this is the listing itself
        # (throttled, forbidden, Azure unavailable). A timer has nothing to redeliver.
        log.error("timer tick stopped: Azure Compute: %s; the next tick tries again", error)
        return None
    results = [*advanced, *audited]
    report = TickReport(
        advanced=len(advanced),
        audited=len(audited),
        deferred=sum(1 for r in results if r.outcome is Outcome.DEFERRED),
    )
    if report.deferred:
        log.warning("timer tick: %d scale set(s) deferred to the next tick", report.deferred)
    return report
