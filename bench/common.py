"""What every benchmark shares: the figure line, fleets, clocks and local servers.

A figure is printed as exactly one line,
`bench: <name> <value> <unit> (baseline <value>, ratio <r>, goal <g>)`, so that a reviewer (or
a script) can compare runs; the absolute numbers behind it go into `detail` (the table).
"""

from __future__ import annotations

import collections
import logging
import math
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from armsim import ScaleSetSpec
from rebalancer.clock import VirtualTime

LINE = re.compile(
    r"^bench: (?P<name>[a-z0-9_.-]+) (?P<value>\S+) (?P<unit>\S+) "
    r"\(baseline (?P<baseline>\S+), ratio (?P<ratio>\S+), goal (?P<goal>[^()]+)\)$"
)


def number(value: float | int | None) -> str:
    """Compact, space-free rendering: integers as such, others with 3 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if not math.isfinite(value):
        return "inf"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    value: float | int | None
    unit: str
    baseline: float | int | None
    goal: str
    met: bool | None
    """None when the figure has no pass/fail goal (a contrast only)."""
    detail: str = ""
    baseline_label: str = ""
    """What the baseline is (the table shows it; the line keeps one number)."""

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline is None:
            return None
        if self.baseline == 0:
            return 0.0 if self.value == 0 else math.inf
        return self.value / self.baseline

    def line(self) -> str:
        return (
            f"bench: {self.name} {number(self.value)} {self.unit} "
            f"(baseline {number(self.baseline)}, ratio {number(self.ratio)}, goal {self.goal})"
        )


def parse_line(text: str) -> dict[str, str]:
    """The fields of one `bench:` line; ValueError naming the line when it does not parse."""
    match = LINE.match(text.strip())
    if match is None:
        raise ValueError(f"not a bench line: {text!r}")
    return match.groupdict()


# -- fleets -------------------------------------------------------------------------------


def mixed_fleet(
    scale_sets: int,
    vms: int,
    *,
    per_group: int = 20,
    tags: dict[str, str] | None = None,
    prefix: str = "vmss",
) -> tuple[ScaleSetSpec, ...]:
    """`scale_sets` balanced zonal scale sets of `vms` VMs, Uniform and Flexible alternating,
    `per_group` to a resource group (as real subscriptions spread them)."""
    base, extra = divmod(vms, 3)
    counts = {zone: base + (1 if i < extra else 0) for i, zone in enumerate(("1", "2", "3"))}
    return tuple(
        ScaleSetSpec(
            f"{prefix}{i:05d}",
            f"rg-bench-{i // per_group:04d}",
            mode="Uniform" if i % 2 == 0 else "Flexible",
            counts=counts,
            tags=dict(tags or {}),
        )
        for i in range(scale_sets)
    )


# -- clocks -------------------------------------------------------------------------------


class SkipAheadTime(VirtualTime):
    """The adapter's `Clock` over armsim's wall clock: real time runs, waits are skipped.

    Requests take their real (latency + CPU) time, while a wait for the throttling budget or a
    `Retry-After` moves armsim's clock forward instead of sleeping. Elapsed time on that clock
    is what the same run would take against Azure: the real seconds plus the waits.
    (That is exactly `VirtualTime` over a `WallClock`; the name says what it is for here.)
    """


def elapsed(clock: Any, since: datetime) -> float:
    return (clock.now() - since).total_seconds()


# -- local servers ------------------------------------------------------------------------


@contextmanager
def azurite_store(**options: Any) -> Iterator[Callable[[], Any]]:
    """An in-memory Azurite; yields a factory of Stores, each on fresh tables."""
    from devkit.azurite import Azurite
    from rebalancer.store import StorageConnection, Store

    opened: list[Store] = []
    with Azurite() as server:

        def factory() -> Store:
            options.setdefault("retry_total", 0)
            connection = StorageConnection("bench", connection_string=server.connection_string)
            store = Store(connection, table_prefix=f"b{uuid.uuid4().hex[:16]}", **options)
            opened.append(store)
            return store

        try:
            yield factory
        finally:
            for store in opened:
                store.close()


class WorkerLogHandler(logging.Handler):
    """What the Functions worker attaches to the root logger: every record formatted and
    queued for the host (its `AsyncLoggingHandler`, which sends each over gRPC)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: collections.deque[tuple[int, str, str]] = collections.deque(maxlen=1000)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.sent.append((record.levelno, record.name, self.format(record)))
        self.count += 1


@contextmanager
def worker_logging() -> Iterator[WorkerLogHandler]:
    """Logging as in a deployed app: the worker's root logger at INFO with its handler (the
    libraries' loggers are set by `bench.wiring.wire`, as `runtime_from_settings` sets them).
    Restored afterwards."""
    names = ("", "rebalancer")
    levels = {name: logging.getLogger(name).level for name in names}
    handler = WorkerLogHandler()
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("rebalancer").setLevel(logging.NOTSET)
    try:
        yield handler
    finally:
        root.handlers = saved_handlers
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# -- throttling arithmetic ----------------------------------------------------------------


def _scope(path: str) -> str:
    lowered = path.lower()
    marker = "/virtualmachinescalesets/"
    index = lowered.find(marker)
    if index < 0:
        return lowered
    end = lowered.find("/", index + len(marker))
    return lowered if end < 0 else lowered[:end]


def charges(requests: list[Any]) -> dict[tuple[str, str], int]:
    """Requests charged to each (policy, scope) by armsim (scope: the scale set, or '')."""
    from armsim.throttling import DEFAULT_POLICIES

    counted: dict[tuple[str, str], int] = {}
    for record in requests:
        for name in record.policies:
            policy = DEFAULT_POLICIES.get(name)
            if policy is None or policy.counter:
                continue
            key = (name, _scope(record.path) if policy.per_resource else "")
            counted[key] = counted.get(key, 0) + 1
    return counted


def budget_floor(requests: list[Any], share: float) -> tuple[float, str]:
    """Least time the requests need when each Azure policy allows only `share` of its burst
    and refill: max over policies of `(charged - share x burst) / (share x rate)`."""
    from armsim.throttling import DEFAULT_POLICIES

    worst, which = 0.0, "none"
    for (name, _), count in charges(requests).items():
        policy = DEFAULT_POLICIES[name]
        seconds = max(0.0, count - share * policy.burst) / (share * policy.per_minute / 60.0)
        if seconds > worst:
            worst, which = seconds, name.rsplit("/", 1)[-1]
    return worst, which


def budget_share_used(requests: list[Any], seconds: float) -> tuple[float, str]:
    """Largest share of a subscription-wide policy's allowance (burst + refill over
    `seconds`) that the requests used, and the policy's name."""
    from armsim.throttling import DEFAULT_POLICIES

    worst, which = 0.0, "none"
    for (name, scope), count in charges(requests).items():
        policy = DEFAULT_POLICIES[name]
        if scope:
            continue
        allowance = policy.burst + policy.per_minute * seconds / 60.0
        if count / allowance > worst:
            worst, which = count / allowance, name.rsplit("/", 1)[-1]
    return worst, which


def resource_share_used(requests: list[Any], seconds: float) -> tuple[float, str]:
    """Largest share of any policy's allowance (burst + refill over `seconds`) the requests
    used, per scale set for per-resource policies, and the policy (with its scale set)."""
    from armsim.throttling import DEFAULT_POLICIES

    worst, which = 0.0, "none"
    for (name, scope), count in charges(requests).items():
        policy = DEFAULT_POLICIES[name]
        allowance = policy.burst + policy.per_minute * seconds / 60.0
        if allowance > 0 and count / allowance > worst:
            where = f" on {scope.rsplit('/', 1)[-1]}" if scope else ""
            worst, which = count / allowance, f"{name.rsplit('/', 1)[-1]}{where} ({count} calls)"
    return worst, which


# -- the app on armsim + Azurite ----------------------------------------------------------


@dataclass
class App:
    """The function app's runtime wired to armsim and a Store, and the host that invokes the
    functions on it."""

    sim: Any
    store: Any
    settings: Any
    compute: Any
    runtime: Any
    host: Any

    def close(self) -> None:
        self.compute.close()


def install_app(
    sim: Any, store: Any, *, budget: Any = None, follow_ups: Any = None, **env: str
) -> App:
    """Settings as the app reads them (enforce mode, armsim's endpoint), the real Compute
    adapter on armsim's clock (with `budget`, if given), wired by the app's own
    `build_runtime` (sending follow-ups to `follow_ups`, if given), and a host that invokes
    the functions on that runtime."""
    from devkit.host import Host
    from devkit.stack import compute_for, settings_for
    from rebalancer.service import build_runtime

    settings = settings_for(sim, **env)
    compute = compute_for(sim, settings, budget=budget, max_wait=None)
    runtime = build_runtime(
        settings, store=store, compute=compute, clock=VirtualTime(sim.clock), follow_ups=follow_ups
    )
    return App(sim, store, settings, compute, runtime, Host(runtime))


class VirtualFollowUps:
    """The follow-up queue on the virtual clock: what Azure Storage does with a visibility
    delay (keep the message, hand it to the queue trigger at its time), for a run whose time
    is armsim's. The app's `FollowUpQueue` is tested against Azurite; its delays run on real
    time, which a virtual-time benchmark cannot wait for."""

    def __init__(self) -> None:
        self.messages: list[tuple[datetime, int, str]] = []
        self.sent = 0

    def schedule(self, follow_up: Any, now: datetime) -> None:
        self.sent += 1
        self.messages.append((max(follow_up.due, now), self.sent, follow_up.to_json()))
        self.messages.sort()

    def next_due(self) -> datetime | None:
        return self.messages[0][0] if self.messages else None

    def take_due(self, now: datetime) -> list[str]:
        due = [body for at, _, body in self.messages if at <= now]
        self.messages = [m for m in self.messages if m[0] > now]
        return due


# -- armsim in its own process ------------------------------------------------------------


def fleet_document(specs: tuple[ScaleSetSpec, ...]) -> dict[str, Any]:
    """A scenario file's content for `python -m armsim serve`."""
    return {
        "scale_sets": [
            {
                "name": spec.name,
                "resource_group": spec.resource_group,
                "mode": spec.mode,
                "counts": dict(spec.counts),
                "tags": dict(spec.tags),
            }
            for spec in specs
        ]
    }


@contextmanager
def armsim_process(
    document: dict[str, Any], *, startup: float = 60.0, options: tuple[str, ...] = ()
) -> Iterator[dict[str, Any]]:
    """`python -m armsim serve` on a scenario, in its own process (so that what is measured
    here is the app's CPU and memory, not the simulator's). Yields its start line: endpoint,
    ca_cert, subscription_id, app_principal_id."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="bench-armsim-") as tmp:
        path = Path(tmp) / "scenario.json"
        path.write_text(json.dumps(document))
        process = subprocess.Popen(
            [sys.executable, "-m", "armsim", "serve", "--scenario", str(path), *options],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines: list[str] = []
            reader = threading.Thread(
                target=lambda: lines.append(process.stdout.readline() if process.stdout else ""),
                daemon=True,
            )
            reader.start()
            reader.join(startup)
            if not lines or not lines[0].strip():
                process.kill()
                _, err = process.communicate(timeout=10)
                raise RuntimeError(f"armsim did not start within {startup:.0f} s: {err[-2000:]}")
            yield json.loads(lines[0])
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


class RequestCounter:
    """Counts the HTTP requests this process sends to an endpoint (every azure-core client
    here sends through `rebalancer.transport.Urllib3Transport`): what the app costs ARM, seen
    from the app's side."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.count = 0
        self._lock = threading.Lock()
        self._original: Any = None

    def __enter__(self) -> RequestCounter:
        from rebalancer.transport import Urllib3Transport

        original = self._original = Urllib3Transport.send
        counter = self

        def send(transport: Any, request: Any, **kwargs: Any) -> Any:
            if str(request.url).startswith(counter.endpoint):
                with counter._lock:
                    counter.count += 1
            return original(transport, request, **kwargs)

        Urllib3Transport.send = send  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from rebalancer.transport import Urllib3Transport

        Urllib3Transport.send = self._original  # type: ignore[method-assign]
