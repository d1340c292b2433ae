"""The end-to-end demo: a small fleet on armsim, its state in Azurite, driven only through the
app's real Functions handlers, in accelerated virtual time.

`run_demo(observer)` starts Azurite and armsim on 127.0.0.1, seeds the fleet below, plays the
script (an autoscale scale-out into a zone without capacity, the capacity coming back), and
then, tick by tick: hands every event armsim emits to the Event Grid function twice (decoded
by the azure.functions converter, as the host does; Event Grid delivers at least once), calls
the timer function, and moves virtual time on. After each tick it gives the observer a `Frame`
(what the fleet looks like and what just happened). It returns a `Summary` and always stops
what it started, also on Ctrl-C.

`python -m rebalancer demo` (`devkit/demo_cli.py`) draws the frames; docs/demo.md.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from rebalancer.clock import VirtualTime
from rebalancer.settings import Mode, OptIn, Settings, load_settings

if TYPE_CHECKING:
    from armsim import ArmSim, ScaleSetView, Scenario
    from devkit.host import Host

log = logging.getLogger("devkit.demo")

RESOURCE_GROUP = "rg-shop"
LOCATION = "westeurope"
CONSTRAINED_SKU = "Standard_D4s_v5"
"""web's size: zone 1 has no room for it when autoscale scales web out."""
SKU = "Standard_D2s_v5"

COOLDOWN_MINUTES = 5
"""The demo's cooldown after an outside change (the default, as Azure's, is 60 minutes)."""
AUDIT_INTERVAL_MINUTES = 1
TICK = timedelta(seconds=30)
"""Virtual time between two timer ticks."""
TIME_LIMIT = timedelta(minutes=45)
"""Virtual time after which the demo gives up waiting for the fleet to settle."""
SETTLE_TICKS = 2
"""Ticks shown after everything settled, so the last picture stays on screen a moment."""

TABLE_PREFIX = "demo"
AUTOSCALE_AT_MAXIMUM = "autoscale_at_maximum"
OPT_IN_TAG = "zone-rebalance"


# -- the fleet and the script ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Intro:
    """What each scale set is there to show, in one sentence."""

    name: str
    role: str


INTROS = (
    Intro("web", "autoscale is scaling it out right now, while zone 1 has no capacity"),
    Intro("api", "out of balance from the start; two VMs are protected from scale-in"),
    Intro("batch", "out of balance, but untagged: the app only reports it"),
    Intro("cache", "already balanced: nothing to do"),
    Intro("jobs", "out of balance, but autoscale holds it at its maximum: a move would be undone"),
)
JOBS_AUTOSCALE = "jobs-autoscale"
"""jobs' autoscale setting: its maximum is jobs' capacity, so a move's extra VM has no room."""


def scenario() -> Scenario:
    """The subscription the demo starts with."""
    from armsim import ScaleSetSpec, Scenario, VmOverride, ZoneCapacity

    enabled = {OPT_IN_TAG: "enabled"}
    return Scenario(
        seed=11,
        capacity=(ZoneCapacity(LOCATION, CONSTRAINED_SKU, "1", 0),),
        scale_sets=(
            ScaleSetSpec(
                "web",
                RESOURCE_GROUP,
                mode="Uniform",
                sku=CONSTRAINED_SKU,
                counts={"1": 3, "2": 3, "3": 3},
                tags={**enabled, "app": "shop"},
            ),
            ScaleSetSpec(
                "api",
                RESOURCE_GROUP,
                mode="Flexible",
                sku=SKU,
                counts={"1": 1, "2": 2, "3": 5},
                tags={**enabled, "app": "shop"},
                overrides=(VmOverride(zone="3", count=2, protect_from_scale_in=True),),
            ),
            ScaleSetSpec(
                "batch",
                RESOURCE_GROUP,
                mode="Uniform",
                sku=SKU,
                counts={"1": 1, "2": 1, "3": 4},
                tags={"app": "reports"},
            ),
            ScaleSetSpec(
                "cache",
                RESOURCE_GROUP,
                mode="Flexible",
                sku=SKU,
                counts={"1": 2, "2": 2, "3": 2},
                tags={**enabled, "app": "shop"},
            ),
            ScaleSetSpec(
                "jobs",
                RESOURCE_GROUP,
                mode="Uniform",
                sku=SKU,
                counts={"1": 1, "2": 1, "3": 3},
                tags={**enabled, "app": "jobs"},
            ),
        ),
    )


def _jobs_autoscale(sim: ArmSim) -> Any:
    jobs = sim.scale_set(RESOURCE_GROUP, "jobs").id
    return sim.autoscale.put(RESOURCE_GROUP, JOBS_AUTOSCALE, target=jobs, minimum=2, maximum=5)


@dataclass(frozen=True, slots=True)
class Beat:
    """Something the world does at a moment of the demo (not the rebalancer)."""

    at: timedelta
    says: str
    act: Callable[[ArmSim], Any]


SCRIPT = (
    Beat(
        timedelta(0),
        f"jobs has an autoscale setting, {JOBS_AUTOSCALE}, whose maximum is 5 VMs: its "
        "capacity now. A move adds a VM first, and autoscale would take it back.",
        _jobs_autoscale,
    ),
    Beat(
        timedelta(0),
        f"Autoscale scales web out from 9 to 15 VMs. Zone 1 has no free capacity for "
        f"{CONSTRAINED_SKU}, so Azure's best-effort placement puts all 6 new VMs (and the 3 extra "
        "ones it overprovisions, then deletes) in zones 2 and 3.",
        lambda sim: sim.actor.set_capacity(RESOURCE_GROUP, "web", 15),
    ),
    Beat(
        timedelta(minutes=2),
        "Azure Compute throttles the app's next list of web's VMs (429, Retry-After 60 s): "
        "web waits for a later tick, the other scale sets go on.",
        lambda sim: sim.faults.add(
            kind="throttle", operation="vmss_vm.list", target="/web/", retry_after=60
        ),
    ),
    Beat(
        timedelta(minutes=9),
        f"Zone 1 has capacity for {CONSTRAINED_SKU} again (no event tells anyone: the "
        "rebalancer finds out when it next looks).",
        lambda sim: sim.actor.set_zone_room(LOCATION, CONSTRAINED_SKU, "1", None),
    ),
)


def demo_env(sim: ArmSim) -> dict[str, str]:
    """The app settings the demo runs with: enforce, a short cooldown, a frequent audit."""
    return {
        "REBALANCER_SUBSCRIPTION_ID": sim.subscription_id,
        "REBALANCER_MODE": "enforce",
        "REBALANCER_COOLDOWN_MINUTES": str(COOLDOWN_MINUTES),
        "REBALANCER_AUDIT_INTERVAL_MINUTES": str(AUDIT_INTERVAL_MINUTES),
        "REBALANCER_APP_PRINCIPAL_ID": sim.scenario.app_principal_id,
        "REBALANCER_ARM_ENDPOINT": sim.endpoint,
        "REBALANCER_STATE_TABLE_PREFIX": TABLE_PREFIX,
        # The demo packs hours into seconds of ticks and audits: at the default 20% of
        # Compute's per-scale-set read budget its reads would wait for the budget, not for
        # Azure. armsim serves nobody else, so the demo may use all of it.
        "REBALANCER_ARM_BUDGET_SHARE": "1",
    }


SETTINGS_SHOWN = (
    "REBALANCER_MODE",
    "REBALANCER_COOLDOWN_MINUTES",
    "REBALANCER_AUDIT_INTERVAL_MINUTES",
)


# -- what the observer sees --------------------------------------------------------------


class VmMark(StrEnum):
    """How one VM is drawn: the kinds a zone's bar is made of."""

    RUNNING = "running"
    NEW = "new"
    """Being created, or not yet reporting healthy."""
    PROTECTED = "protected"
    DELETING = "deleting"
    OTHER = "other"
    """Deallocated, stopped, failed or unhealthy."""


@dataclass(frozen=True, slots=True)
class OperationView:
    """A rebalancing operation as the demo shows it."""

    operation_id: str
    state: str
    active: bool
    moves: int
    """VMs moved: the deleted sources of a succeeded operation, else 0."""
    reason: str
    """The code of its last transition (docs/operations.md), e.g. `new_vms_placed`."""
    updated_at: datetime
    says: str
    """Where it stands, in words."""


@dataclass(frozen=True, slots=True)
class SetView:
    """One scale set at one moment."""

    name: str
    id: str
    orchestration: str
    mode: str
    """What the app does with it: `enforce` (moves VMs), `audit` (reports), `disabled`."""
    tag: str | None
    zones: Mapping[str, tuple[str, ...]]
    """Zone -> the VMs in it that count as capacity (and deleting ones), as `VmMark` kinds."""
    counts: Mapping[str, int]
    protected: tuple[str, ...]
    """Names of its protected VMs (present, not deleting)."""
    operations: tuple[OperationView, ...]
    """Oldest first; the last may be in flight."""
    verdict: str
    """The app's latest decision about it, in words."""
    reason: str = ""
    """The code of the app's latest decision (docs/operations.md), e.g. `autoscale_at_maximum`."""

    @property
    def balanced(self) -> bool:
        return is_balanced(self.counts)

    @property
    def held(self) -> bool:
        """Left alone for a named reason that only its owners can change (a setting of theirs),
        not for lack of trying."""
        return self.reason == AUTOSCALE_AT_MAXIMUM

    @property
    def in_flight(self) -> OperationView | None:
        last = self.operations[-1] if self.operations else None
        return last if last is not None and last.active else None

    @property
    def settled(self) -> bool:
        """Nothing moving: no operation in flight, no VM being created or deleted."""
        marks = {mark for vms in self.zones.values() for mark in vms}
        return self.in_flight is None and not marks & {VmMark.NEW, VmMark.DELETING}


@dataclass(frozen=True, slots=True)
class Frame:
    """The fleet after one tick, and what happened during it."""

    now: datetime
    elapsed: timedelta
    tick: int
    events: int
    """Event Grid events delivered to the function so far."""
    sets: tuple[SetView, ...]
    news: tuple[str, ...]
    """What happened since the previous frame, in words."""
    settings: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the demo's servers listen (reported so that a test can check they are gone)."""

    azurite_port: int
    armsim_endpoint: str


Observer = Callable[[Frame], None]


@dataclass(frozen=True, slots=True)
class SetSummary:
    name: str
    id: str
    orchestration: str
    mode: str
    before: Mapping[str, int]
    after: Mapping[str, int]
    balanced: bool
    operations: tuple[OperationView, ...]
    protected_before: tuple[str, ...]
    protected_after: tuple[str, ...]
    reason: str = ""
    verdict: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "before": dict(self.before),
            "after": dict(self.after),
            "balanced": self.balanced,
            "mode": self.mode,
            "reason": self.reason,
            "verdict": self.verdict,
            "operations": [{"state": o.state, "moves": o.moves} for o in self.operations],
            "protected": {
                "before": list(self.protected_before),
                "after": list(self.protected_after),
            },
        }


@dataclass(frozen=True, slots=True)
class Summary:
    sets: tuple[SetSummary, ...]
    converged: bool
    """Every enforce-mode scale set balanced and settled before the time limit."""
    elapsed: timedelta
    ticks: int
    events: int
    broken: tuple[str, ...] = ()
    """Invariants (devkit/invariants.py) the run broke, each as the judge words it."""

    def to_json(self) -> dict[str, Any]:
        return {"scaleSets": [s.to_json() for s in self.sets]}


def is_balanced(counts: Mapping[str, int]) -> bool:
    """Every zone within +/-1 VM of every other."""
    return not counts or max(counts.values()) - min(counts.values()) <= 1


def summarize(
    before: tuple[SetView, ...], after: tuple[SetView, ...], frame: Frame, settled: bool
) -> Summary:
    first = {s.id: s for s in before}
    sets = tuple(
        SetSummary(
            name=s.name,
            id=s.id,
            orchestration=s.orchestration,
            mode=s.mode,
            before=MappingProxyType(dict(first[s.id].counts if s.id in first else {})),
            after=MappingProxyType(dict(s.counts)),
            balanced=s.balanced,
            operations=s.operations,
            protected_before=first[s.id].protected if s.id in first else (),
            protected_after=s.protected,
            reason=s.reason,
            verdict=s.verdict,
        )
        for s in after
    )
    return Summary(sets, settled, frame.elapsed, frame.tick, frame.events)


def converged(sets: tuple[SetView, ...]) -> bool:
    return all(s.settled and (s.balanced or s.mode != "enforce" or s.held) for s in sets)


def describe_operation(record: Any) -> str:
    """Where an operation stands, in words a newcomer can follow."""
    from rebalancer.operation import State

    moves = record.moves
    pairs = ", ".join(f"zone {m.from_zone} -> zone {m.to_zone}" for m in moves)
    kept = ", ".join(record.kept)
    created = ", ".join(
        f"{vm} (zone {zone})" if zone else vm for vm, zone in sorted(record.created.items())
    )
    state = record.state
    if state is State.PLANNED:
        return f"planned: move {len(moves)} VM ({pairs})"
    if state is State.SCALING_OUT:
        return (
            f"capacity raised {record.baseline.capacity} -> {record.target_capacity} so Azure "
            f"creates a VM in zone {', '.join(record.target_zones)} ({pairs})"
        )
    if state is State.AWAITING_HEALTH:
        return f"new VM {created or '?'} created; waiting for it to report healthy"
    if state is State.SCALING_IN:
        if not record.sources:
            return f"new VM {kept} is healthy; choosing which VM to delete from the fuller zone"
        sources = ", ".join(record.sources)
        return f"new VM {kept} is healthy; deleting {sources} from the fuller zone"
    if state is State.SUCCEEDED:
        done = len(record.sources)
        return f"done: {done} VM moved ({pairs})" if done else "done"
    if record.outcome is not None:
        return f"{state}: {record.outcome.describe()}"
    return str(state)


def describe_verdict(body: str | None) -> str:
    """The reconciler's stored verdict (`Verdict.to_json`), in words."""
    if not body:
        return "not assessed yet"
    try:
        verdict = json.loads(body)
    except ValueError:
        return "not assessed yet"
    decision, reason, detail = verdict.get("decision"), verdict.get("reason"), verdict.get("detail")
    if verdict.get("balanced"):
        return "balanced: nothing to do"
    if decision == "move":
        return f"out of balance: {str(detail).split(';', 1)[0]}"
    if reason == "not_opted_in":
        return f"out of balance; {detail or 'not opted in'}"
    if reason == "cooldown":
        return "out of balance; waiting out the cooldown after someone else's change"
    if reason == AUTOSCALE_AT_MAXIMUM:
        return f"out of balance; left alone ({reason}): {detail}"
    text = f"{decision} ({str(reason).replace('_', ' ')})"
    return f"{text}: {detail}" if detail else text


def news_between(previous: tuple[SetView, ...], current: tuple[SetView, ...]) -> list[str]:
    """What changed between two pictures of the fleet, in words."""
    lines = []
    before = {s.id: s for s in previous}
    for s in current:
        old = before.get(s.id)
        old_ops = {o.operation_id: o for o in (old.operations if old else ())}
        for operation in s.operations:
            seen = old_ops.get(operation.operation_id)
            if seen is None or (seen.state, seen.says) != (operation.state, operation.says):
                lines.append(f"{s.name}: operation {operation.state}: {operation.says}")
        fresh = not s.verdict.startswith("last operation")  # that news was told already
        if old is not None and old.verdict != s.verdict and s.in_flight is None and fresh:
            lines.append(f"{s.name}: {s.verdict}")
        if old is not None and old.counts != s.counts:
            lines.append(f"{s.name}: VMs per zone now {format_counts(s.counts)}")
    return lines


def format_counts(counts: Mapping[str, int]) -> str:
    return "/".join(str(counts[z]) for z in sorted(counts, key=_zone_key))


def _zone_key(zone: str) -> tuple[int, str]:
    return (0, f"{int(zone):06d}") if zone.isdigit() else (1, zone)


# -- the driver --------------------------------------------------------------------------


class _Capture(logging.Handler):
    """Keeps the app's log lines (shown when the demo fails) off the screen."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque(maxlen=200)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a log line never breaks the demo
            self.handleError(record)


@contextmanager
def captured_logs() -> Iterator[_Capture]:
    root, app = logging.getLogger(), logging.getLogger("rebalancer")
    saved = (root.handlers[:], root.level, app.level)
    capture = _Capture()
    root.handlers = [capture]
    root.setLevel(logging.WARNING)
    app.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        root.handlers, _, _ = saved
        root.setLevel(saved[1])
        app.setLevel(saved[2])


class DemoError(RuntimeError):
    """The demo could not run (Azurite missing, a port taken); the message says what to do."""


def run_demo(
    observer: Observer,
    *,
    pace: float = 0.0,
    on_started: Callable[[Endpoints], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Summary, tuple[str, ...]]:
    """Run the whole demo; returns the summary and the app's last log lines.

    `pace`: real seconds to wait after each frame (0: as fast as it goes). Everything started
    here is stopped before returning or raising, KeyboardInterrupt included.
    """
    from armsim import ArmSim
    from devkit.azurite import Azurite, AzuriteError
    from devkit.host import Host

    azurite = Azurite()
    sim = ArmSim(scenario())
    resources: list[Callable[[], None]] = []
    with captured_logs() as capture:
        app = Host()  # azure.functions logs a warning on import
        try:
            try:
                azurite.start()
            except AzuriteError as error:
                raise DemoError(str(error)) from error
            sim.serve()
            if on_started is not None:
                on_started(Endpoints(azurite.port or 0, sim.endpoint))
            summary = _drive(sim, azurite, app, observer, pace, sleep, resources)
        finally:
            _stop(resources, sim, azurite)
        return summary, tuple(capture.lines)


def _stop(resources: list[Callable[[], None]], sim: ArmSim, azurite: Any) -> None:
    """Stop everything, each step on its own, newest first; a second Ctrl-C waits for it."""
    with _interrupts_deferred():
        for close in reversed(resources):
            try:
                close()
            except Exception:
                log.exception("closing a demo resource failed")
        try:
            sim.stop()
        finally:
            azurite.stop()


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while cleaning up (signal handlers live in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _drive(
    sim: ArmSim,
    azurite: Any,
    app: Host,
    observer: Observer,
    pace: float,
    sleep: Callable[[float], None],
    resources: list[Callable[[], None]],
) -> Summary:
    from devkit.invariants import Invariants
    from devkit.stack import compute_for
    from rebalancer import service
    from rebalancer.store import StorageConnection, Store

    env = demo_env(sim)
    settings = load_settings(env)
    store = Store(
        StorageConnection("AzureWebJobsStorage", connection_string=azurite.connection_string),
        table_prefix=settings.table_prefix,
    )
    resources.append(store.close)
    compute = compute_for(sim, settings)
    resources.append(compute.close)
    app.runtime = service.build_runtime(
        settings, store=store, compute=compute, clock=VirtualTime(sim.clock)
    )

    judge = Invariants.watch(sim, store, settings)
    inbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    sim.add_event_sink(inbox.put)
    shown = MappingProxyType({name: env[name] for name in SETTINGS_SHOWN})
    start = sim.clock.now()
    script = list(SCRIPT)
    delivered = 0
    retry: list[dict[str, Any]] = []
    opening = _introduction(_picture(sim, store, settings, ()))
    while script and script[0].at <= timedelta(0):
        beat = script.pop(0)
        beat.act(sim)
        opening.append(beat.says)
    first = previous = _picture(sim, store, settings, ())
    observer(Frame(start, timedelta(0), 0, 0, first, tuple(opening), settings=shown))
    sleep(pace * 3)
    tick, calm = 0, 0
    while True:
        tick += 1
        now = sim.clock.now()
        news: list[str] = []
        while script and start + script[0].at <= now:
            beat = script.pop(0)
            beat.act(sim)
            news.append(beat.says)
        pending, retry = retry, []
        while True:
            try:
                pending.append(inbox.get_nowait())
            except queue.Empty:
                break
        for payload in pending:
            news.extend(_outside_event(payload, settings, sim))
            try:
                app.event(payload)
                app.event(payload)  # at-least-once delivery: the app must act only once
                delivered += 1
            except service.TransientFailure:
                retry.append(payload)  # Event Grid delivers it again later
        app.timer()
        touched = frozenset(filter(None, map(_scale_set_key, pending)))
        current = _picture(sim, store, settings, previous, touched)
        news.extend(news_between(previous, current))
        previous = current
        frame = Frame(now, now - start, tick, delivered, current, tuple(news), settings=shown)
        observer(frame)
        done = not script and not retry and converged(current)
        calm = calm + 1 if done else 0
        if calm > SETTLE_TICKS or now - start >= TIME_LIMIT:
            summary = summarize(first, current, frame, settled=done)
            return replace(summary, broken=_self_check(judge, settled=done))
        sleep(pace)
        sim.advance(TICK.total_seconds())


def _self_check(judge: Any, *, settled: bool) -> tuple[str, ...]:
    """The invariants the test suite and the chaos suite check, over the whole run."""
    try:
        judge.check("in the demo", settled=settled, single_scale_out=False)
    except AssertionError as error:
        return tuple(line.strip() for line in str(error).splitlines()[1:])
    return ()


def _introduction(sets: tuple[SetView, ...]) -> list[str]:
    roles = {intro.name: intro.role for intro in INTROS}
    return [
        f"{s.name} ({s.orchestration}, {format_counts(s.counts)}, tag "
        f"{OPT_IN_TAG}={s.tag or '(none)'} -> {s.mode}): {roles.get(s.name, '')}"
        for s in sets
    ]


def _outside_event(payload: Mapping[str, Any], settings: Settings, sim: ArmSim) -> list[str]:
    """Say so when an event reports someone else's change (it starts the cooldown)."""
    data = payload.get("data") or {}
    principal = ((data.get("authorization") or {}).get("evidence") or {}).get("principalId")
    if principal == settings.app_principal_id:
        return []
    name = str(payload.get("subject", "")).rsplit("/", 1)[-1]
    until = _event_time(payload, sim.clock.now()) + settings.cooldown
    return [
        f"Event Grid -> on_resource_event: {data.get('operationName')} on {name} by someone "
        f"else; {name} cools down until {until:%H:%M:%S}"
    ]


def _event_time(payload: Mapping[str, Any], default: datetime) -> datetime:
    """`eventTime` (ARM writes 7 fractional digits; Python reads up to 6)."""
    text = str(payload.get("eventTime", ""))
    try:
        return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00"))
    except ValueError:
        return default


def _picture(
    sim: ArmSim,
    store: Any,
    settings: Settings,
    previous: tuple[SetView, ...],
    touched: frozenset[str] = frozenset(),
) -> tuple[SetView, ...]:
    """The fleet as armsim has it, with the app's operations and verdicts from Table Storage.

    A scale set's operations are read again only when they may have changed: one is (or just
    was) in flight, or an event about the set arrived (the app's own writes cause events, a
    rejected one at once). This keeps the demo's own Table reads from slowing it down.
    """
    active = {row.scale_set_key for row in store.active_operations()} | touched
    known = {s.id.lower(): s.operations for s in previous if s.in_flight is None}
    return tuple(
        _set_view(
            view,
            store,
            settings,
            None if view.id.lower() in active else known.get(view.id.lower()),
        )
        for view in sorted(sim.state, key=_intro_order)
    )


def _scale_set_key(payload: Mapping[str, Any]) -> str | None:
    from rebalancer.model import ScaleSetRef

    try:
        return ScaleSetRef.parse(str(payload.get("subject", ""))).key
    except ValueError:
        return None


def _intro_order(view: ScaleSetView) -> int:
    names = [intro.name for intro in INTROS]
    return names.index(view.name) if view.name in names else len(names)


def _set_view(
    view: ScaleSetView,
    store: Any,
    settings: Settings,
    operations: tuple[OperationView, ...] | None = None,
) -> SetView:
    key = view.id.lower()
    tag = next((v for k, v in view.tags.items() if k.lower() == OPT_IN_TAG), None)
    opt_in = settings.opt_in(tag)
    if opt_in is OptIn.ENABLED and settings.mode is Mode.ENFORCE:
        mode = "enforce"
    elif opt_in is OptIn.DISABLED or settings.mode is Mode.OFF:
        mode = "disabled"
    else:
        mode = "audit"
    if operations is None:
        operations = _operations(store, key)
    assessment = store.last_assessment(key)
    zones: dict[str, list[str]] = {zone: [] for zone in view.zones}
    for vm in view.vms:
        if vm.zone is None or vm.provisioning_state == "Failed":
            continue
        zones.setdefault(vm.zone, []).append(_mark(vm))
    protected = tuple(
        vm.name
        for vm in view.vms
        if (vm.protect_from_scale_in or vm.protect_from_scale_set_actions) and vm.counts
    )
    return SetView(
        name=view.name,
        id=view.id,
        orchestration=view.mode,
        mode=mode,
        tag=tag,
        zones=MappingProxyType(
            {z: tuple(sorted(m, key=_MARK_ORDER.index)) for z, m in zones.items()}
        ),
        counts=MappingProxyType(view.zone_counts()),
        protected=protected,
        operations=tuple(operations),
        verdict=_status(operations, assessment),
        reason=_reason(assessment),
    )


def _reason(assessment: Any) -> str:
    try:
        return str(json.loads(assessment.body).get("reason", "")) if assessment else ""
    except ValueError:
        return ""


def _operations(store: Any, key: str) -> tuple[OperationView, ...]:
    from rebalancer.operation import OperationRecord, State

    views = []
    for row in reversed(store.history(key)):
        record = OperationRecord.from_json(row.body)
        views.append(
            OperationView(
                operation_id=record.operation_id,
                state=str(record.state),
                active=record.active,
                moves=len(record.sources) if record.state is State.SUCCEEDED else 0,
                reason=str(record.history[-1].reason) if record.history else "",
                updated_at=record.updated_at,
                says=describe_operation(record),
            )
        )
    return tuple(views)


def _status(operations: tuple[OperationView, ...], assessment: Any) -> str:
    """The app's verdict, unless an operation finished since it was recorded."""
    last = operations[-1] if operations else None
    newer = last is not None and (assessment is None or assessment.at < last.updated_at)
    if last is not None and not last.active and newer:
        return f"last operation {last.state}: {last.says}"
    return describe_verdict(assessment.body if assessment else None)


_MARK_ORDER = (VmMark.PROTECTED, VmMark.RUNNING, VmMark.OTHER, VmMark.NEW, VmMark.DELETING)


def _mark(vm: Any) -> str:
    if vm.provisioning_state == "Deleting":
        return VmMark.DELETING
    if vm.protect_from_scale_in or vm.protect_from_scale_set_actions:
        return VmMark.PROTECTED
    if vm.provisioning_state == "Creating" or (
        vm.power_state == "running" and vm.health == "initializing"
    ):
        return VmMark.NEW
    if vm.power_state == "running" and vm.health == "healthy":
        return VmMark.RUNNING
    return VmMark.OTHER
