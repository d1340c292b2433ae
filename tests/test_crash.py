"""Crash the reconciler at every step boundary and show that a fresh one finishes the job.

A step boundary is the moment before or after an Azure call or a Table write: every HTTP
request the process sends to armsim, and every non-GET request to Azurite (entity writes,
deletes and batch transactions), hooked at azure-core's transport so that the Store's internal
writes (archiving a finished operation, freeing its slot) are boundaries too. "After" means the
server has applied the request and answered, and the process dies before reading the answer.

For each reference scenario:
1. an uncrashed run counts the boundaries and checks the invariants at every one of them;
2. for each boundary N, a new armsim and new tables replay the scenario with a process that
   raises `Crash` (a BaseException, so no `except Exception` and no `finally` that does I/O
   rescues it: every later request of the dead process crashes too) at boundary N; the
   invariants are checked right there; then a fresh Reconciler with its own Store and
   ComputeAdapter (nothing shared but Azurite and armsim) runs to the end, checking the
   invariants after every tick; the end state must equal the uncrashed run's.

Which boundaries need a run of their own: between two requests nothing durable happens, so
crashing after request i leaves Azure and Table Storage exactly as crashing before request i+1
does, and crashing after a read leaves them as crashing before it. Every boundary therefore
falls into one class per durable state: "before anything" or "after write W". Each class is
replayed once, which keeps the suite to seconds per scenario; `CRASH_EVERY_BOUNDARY=1` replays
every boundary separately.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from armsim import ScaleSetSpec, Scenario, VmOverride, ZoneCapacity
from devkit.stack import Drive, Stack, compute_for, running_stack
from devkit.tables import lock_holder, slots_in_use, table_names
from rebalancer.operation import OperationRecord
from rebalancer.reconciler import Reconciler
from rebalancer.store import Store
from rebalancer.transport import Urllib3Transport
from tests.azurite import make_store

ENABLED = {"zone-rebalance": "enabled"}
EVERY_BOUNDARY = os.environ.get("CRASH_EVERY_BOUNDARY") == "1"
WORKERS = 4
"""Crash runs at once: each has its own armsim and tables; the time goes into waiting."""
LEASE = timedelta(minutes=1)
"""The lock lease: a dead process's lock blocks the next one this long (virtual time)."""


class Crash(BaseException):
    """The process died at this step boundary."""


@dataclass(frozen=True, slots=True)
class Boundary:
    index: int
    when: str
    """`before` or `after`."""
    method: str
    target: str
    """`arm` or `table`."""
    path: str
    write: bool

    def __str__(self) -> str:
        return f"#{self.index} {self.when} {self.target} {self.method} {self.path}"


@dataclass
class Process:
    """One reconciler process whose requests are step boundaries; it may die at one."""

    arm_endpoint: str
    crash_at: int | None = None
    on_boundary: Callable[[Boundary], None] | None = None
    boundaries: list[Boundary] = field(default_factory=list)
    dead: Boundary | None = None

    def send(self, send: Callable[..., Any], transport: Any, request: Any, **kwargs: Any) -> Any:
        if self.dead is not None:
            raise Crash(f"the process died at {self.dead}")
        url = str(request.url)
        target = "arm" if url.startswith(self.arm_endpoint) else "table"
        method = str(request.method).upper()
        if target == "table" and method == "GET":
            return send(transport, request, **kwargs)
        path = url.split("?", 1)[0].split("/", 3)[-1]
        write = method != "GET"
        self._boundary("before", method, target, path, write)
        response = send(transport, request, **kwargs)
        self._boundary("after", method, target, path, write)
        return response

    def _boundary(self, when: str, method: str, target: str, path: str, write: bool) -> None:
        boundary = Boundary(len(self.boundaries), when, method, target, path, write)
        self.boundaries.append(boundary)
        if self.on_boundary is not None:
            with _outside():
                self.on_boundary(boundary)
        if boundary.index == self.crash_at:
            self.dead = boundary
            raise Crash(f"crash at {boundary}")


_current = threading.local()


@contextmanager
def _inside(process: Process) -> Iterator[None]:
    previous = getattr(_current, "process", None)
    _current.process = process
    try:
        yield
    finally:
        _current.process = previous


@contextmanager
def _outside() -> Iterator[None]:
    previous = getattr(_current, "process", None)
    _current.process = None
    try:
        yield
    finally:
        _current.process = previous


@pytest.fixture
def hooked_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every azure-core request of this thread through the current Process, if any."""
    original = Urllib3Transport.send

    def send(self: Any, request: Any, **kwargs: Any) -> Any:
        process = getattr(_current, "process", None)
        if process is None:
            return original(self, request, **kwargs)
        return process.send(original, self, request, **kwargs)

    monkeypatch.setattr(Urllib3Transport, "send", send)


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndState:
    counts: dict[str, int]
    capacity: int
    vms: tuple[tuple[str, str | None, str, str | None], ...]
    operations: tuple[tuple[str, int, str | None], ...]
    backoffs: tuple[tuple[str, int], ...]
    """Zones backed off at the end, with their failure counts."""


def end_state(stack: Stack, run: Drive) -> EndState:
    view = stack.sim.scale_set("rg-web", "web")
    records: list[OperationRecord] = run.records()
    return EndState(
        counts=view.zone_counts(),
        capacity=view.capacity,
        vms=tuple(
            sorted((vm.instance_id, vm.zone, vm.provisioning_state, vm.health) for vm in view.vms)
        ),
        operations=tuple(
            (r.state.value, r.k, r.outcome.value if r.outcome else None) for r in records
        ),
        backoffs=tuple(
            sorted((b.zone, b.failures) for b in stack.store.backoffs(stack.sim.clock.now()))
        ),
    )


class Tables:
    """One run's tables on Azurite: a client per process, all dropped at the end."""

    def __init__(self, azurite: Any) -> None:
        self.azurite = azurite
        self.prefix = f"t{uuid.uuid4().hex[:16]}"
        self.stores: list[Store] = []

    def store(self) -> Store:
        created = make_store(self.azurite, self.prefix)
        self.stores.append(created)
        return created

    def __enter__(self) -> Tables:
        return self

    def __exit__(self, *exc_info: object) -> None:
        from azure.data.tables import TableServiceClient

        names = table_names(self.stores[0]) if self.stores else ()
        for store in self.stores:
            store.close()
        with TableServiceClient.from_connection_string(self.azurite.connection_string) as tables:
            for name in names:
                tables.delete_table(name)


@dataclass
class Harness:
    scenario: Scenario
    azurite: Any
    settle: Callable[[Drive], None]
    env: dict[str, str] = field(default_factory=dict)
    step: float = 30.0
    """Virtual seconds per tick."""

    def reference(self) -> tuple[EndState, list[Boundary], int]:
        """The uncrashed run; the invariants are checked at every boundary where the durable
        state may have changed (the invariants read nothing else)."""
        with Tables(self.azurite) as tables, self._stack(tables) as stack:
            process = Process(stack.sim.endpoint)
            run = Drive(stack, reconciler=_reconciler(stack, tables), step=self.step)
            process.on_boundary = lambda b: _distinct(b) and run.check(f"at {b}")
            with _inside(process):
                self.settle(run)
            assert run.checker is not None
            return end_state(stack, run), process.boundaries, run.checker.checks

    def crashed(self, crash_at: int) -> tuple[EndState, Boundary]:
        """Die at boundary `crash_at`, then let a fresh process finish."""
        with Tables(self.azurite) as tables, self._stack(tables) as stack:
            process = Process(stack.sim.endpoint, crash_at=crash_at)
            doomed = _reconciler(stack, tables)
            run = Drive(stack, reconciler=doomed, step=self.step)
            try:
                with _inside(process):
                    self.settle(run)
            except Crash:
                pass
            assert process.dead is not None, f"boundary {crash_at} was never reached"
            run.check(f"right after the crash at {process.dead}")
            doomed.compute.close()  # its sockets; its memory is simply dropped
            run.reconciler = _reconciler(stack, tables)
            run.check_every_tick = False  # the journal replay still judges every delete
            self.settle(run)
            return end_state(stack, run), process.dead

    def _stack(self, tables: Tables) -> AbstractContextManager[Stack]:
        return running_stack(self.scenario, tables.store(), **self.env)


def _reconciler(stack: Stack, tables: Tables) -> Reconciler:
    """A fresh process: its own Store client and Compute adapter, and a short lease."""
    compute = compute_for(stack.sim, stack.settings)
    return stack.reconciler(store=tables.store(), compute=compute, lease=LEASE)


def _distinct(boundary: Boundary) -> bool:
    """Whether Azure or Table Storage may differ here from every earlier boundary."""
    return boundary.index == 0 or (boundary.when == "after" and boundary.write)


def crash_points(boundaries: list[Boundary]) -> list[int]:
    """One boundary per durable state (see the module docstring), or all of them."""
    return [b.index for b in boundaries if EVERY_BOUNDARY or _distinct(b)]


def _until_settled(run: Drive) -> None:
    run.until_settled(ticks=150)


def _until_rolled_back(run: Drive) -> None:
    run.until(lambda: bool(run.records()) and run.idle(), ticks=150, what="the rollback")
    run.check("at the end", settled=True)


REFERENCE = {
    "uniform-1-3-3": (
        Scenario(
            scale_sets=(
                ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),
            )
        ),
        _until_settled,
    ),
    "flexible-0-2-4-surge-2": (
        Scenario(
            scale_sets=(
                ScaleSetSpec(
                    "web", "rg-web", mode="Flexible", counts={"1": 0, "2": 2, "3": 4}, tags=ENABLED
                ),
            )
        ),
        _until_settled,
    ),
    "uniform-no-capacity-rollback": (
        Scenario(
            scale_sets=(
                ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),
            ),
            capacity=(ZoneCapacity("westeurope", "Standard_D2s_v5", "1", 0),),
        ),
        _until_rolled_back,
    ),
    "flexible-unhealthy-source-protected": (
        Scenario(
            scale_sets=(
                ScaleSetSpec(
                    "web",
                    "rg-web",
                    mode="Flexible",
                    counts={"1": 1, "2": 3, "3": 4},
                    tags=ENABLED,
                    new_vm_health="unhealthy",
                    overrides=(
                        VmOverride(zone="2", count=3, protect_from_scale_in=True),
                        VmOverride(zone="3", count=2, protect_from_scale_in=True),
                        VmOverride(zone="3", count=2, health="unhealthy"),
                    ),
                ),
            )
        ),
        _until_settled,
    ),
}
ENV = {
    "flexible-0-2-4-surge-2": {"max_surge": "2"},
    "flexible-unhealthy-source-protected": {"health_timeout_minutes": "5"},
}
STEP = {"flexible-unhealthy-source-protected": 100.0}  # a 5-minute health wait in few ticks


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_a_crash_at_any_step_boundary_is_finished_by_a_fresh_reconciler(
    name: str, azurite: Any, hooked_transport: None
) -> None:
    scenario, settle = REFERENCE[name]
    harness = Harness(scenario, azurite, settle, ENV.get(name, {}), STEP.get(name, 30.0))
    expected, boundaries, checks = harness.reference()
    points = crash_points(boundaries)
    assert checks >= len([b for b in boundaries if _distinct(b)])  # held at every state
    assert any(b.target == "arm" and b.method == "PATCH" for b in boundaries)
    assert any(b.target == "table" and b.write for b in boundaries)
    started = time.perf_counter()
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="crash") as pool:
        for got, died_at in pool.map(harness.crashed, points):
            assert got == expected, f"after a crash at {died_at}:\n{got}\n!=\n{expected}"
    spent = time.perf_counter() - started
    print(f"{name}: {len(boundaries)} boundaries, {len(points)} crash runs, {spent:.1f} s")


def test_a_crash_mid_run_leaves_the_lock_to_expire_and_the_next_process_waits(
    azurite: Any, hooked_transport: None
) -> None:
    """The dead process's lock is not released (its `finally` dies too); the fresh one is
    told BUSY until the lease runs out, then takes over."""
    scenario, _ = REFERENCE["uniform-1-3-3"]
    with Tables(azurite) as tables, running_stack(scenario, tables.store()) as stack:
        probe = Process(stack.sim.endpoint)
        run = Drive(stack, reconciler=_reconciler(stack, tables))
        with _inside(probe):
            run.tick()
        patch = next(b for b in probe.boundaries if b.method == "PATCH")
    with Tables(azurite) as tables, running_stack(scenario, tables.store()) as stack:
        process = Process(stack.sim.endpoint, crash_at=patch.index + 1)
        run = Drive(stack, reconciler=_reconciler(stack, tables))
        with pytest.raises(Crash), _inside(process):
            run.tick()
        assert lock_holder(stack.store, run.ref().key, stack.sim.clock.now()) is not None
        run.reconciler = _reconciler(stack, tables)
        (result,) = run.tick()
        assert result.outcome.value == "busy"
        run.until_settled()
        assert sorted(stack.sim.scale_set("rg-web", "web").zone_counts().values()) == [2, 2, 3]


def test_the_hook_sees_every_write_of_the_store_including_archiving(
    azurite: Any, hooked_transport: None
) -> None:
    """Archiving a finished operation takes several Table writes inside one Store call; each
    must be a boundary of its own, or a crash between them would never be tested."""
    scenario, settle = REFERENCE["uniform-1-3-3"]
    _, boundaries, _ = Harness(scenario, azurite, settle).reference()
    writes = [b for b in boundaries if b.target == "table" and b.write and b.when == "after"]
    assert any(b.method == "DELETE" for b in writes)  # lock release, live row after archiving
    assert any("$batch" in b.path for b in writes)  # transactions: begin, commit
    assert sum(1 for b in boundaries if b.target == "arm" and b.write) == 2 * 2  # PATCH, POST


def test_a_crash_before_archiving_does_not_keep_the_only_slot(
    azurite: Any, hooked_transport: None
) -> None:
    """With one slot and two unbalanced sets, the process dies right after writing the first
    operation as finished, before archiving it and freeing its slot. The slot must not stay
    taken: the next process finishes the archive and the second set gets its move."""
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),
            ScaleSetSpec("api", "rg-web", counts={"1": 3, "2": 1, "3": 3}, tags=ENABLED),
        )
    )
    env = {"max_concurrent_operations": "1"}
    with Tables(azurite) as tables, running_stack(scenario, tables.store(), **env) as stack:
        probe = Process(stack.sim.endpoint)
        run = Drive(stack, reconciler=_reconciler(stack, tables))
        with _inside(probe):
            run.until(lambda: any(r.active is False for r in _all(run)), what="one finished")
        archive = next(b for b in probe.boundaries if "history" in b.path and b.when == "before")
    with Tables(azurite) as tables, running_stack(scenario, tables.store(), **env) as stack:
        process = Process(stack.sim.endpoint, crash_at=archive.index)
        run = Drive(stack, reconciler=_reconciler(stack, tables))
        with pytest.raises(Crash), _inside(process):
            run.until(lambda: False, what="the crash")
        run.check("right after the crash")
        assert slots_in_use(stack.store)  # the finished operation still holds the slot
        run.reconciler = _reconciler(stack, tables)
        run.until_settled(ticks=150)
        assert {v.name: sorted(v.zone_counts().values()) for v in stack.sim.state} == {
            "web": [2, 2, 3],
            "api": [2, 2, 3],
        }
        assert [r.state.value for r in _all(run)] == ["succeeded", "succeeded"]
        assert slots_in_use(stack.store) == []


def _all(run: Drive) -> list[OperationRecord]:
    return sorted(
        (r for name in ("web", "api") for r in run.records(name)), key=lambda r: r.created_at
    )
