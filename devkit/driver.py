"""Drive the app only through its Azure Functions entry points, as the host and Event Grid do.

`FunctionsDriver(stack)` runs the functions (devkit/host.py) on a runtime of the stack (armsim +
Azurite) and collects every Event Grid event armsim emits. Each `tick()`:

1. delivers the queued events to the real decorated Event Grid function, each decoded by
   `EventGridEventInConverter` from the exact payload armsim produced, the way Event Grid
   does it: at least once (sometimes twice), in a shuffled order, some held back a tick;
   a delivery that raises `service.TransientFailure` is delivered again later;
2. when the schedule is due (every `timer_every` virtual seconds, 5 minutes as the deployed
   `REBALANCER_TIMER_SCHEDULE`), invokes the timer function with a payload decoded by
   `TimerRequestConverter`; between two timer ticks only events move the app;
3. checks the never-rules (devkit/invariants.py) and that every write the app sent to armsim
   is recorded once by the operation step that sent it;
4. moves armsim's virtual time on by `step` seconds.

Randomness comes from one seeded generator, so a failing run repeats exactly.
"""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from devkit.host import Host
from devkit.invariants import Invariants
from devkit.stack import Stack
from devkit.tables import lock_holder
from rebalancer import service
from rebalancer.operation import OperationRecord, State

APP_WRITES = {"vmss.update": "set_capacity", "vmss.delete_instances": "delete_instances"}
"""armsim's name of each write the app makes -> the action its operation record names."""


@dataclass
class Delivery:
    """One attempt to deliver an event to the function."""

    event_id: str
    operation_name: str
    at: datetime
    retried: bool
    """The function raised TransientFailure: Event Grid delivers the event again later."""


@dataclass
class FunctionsDriver:
    stack: Stack
    seed: int = 0
    step: float = 30.0
    """Virtual seconds per tick (events are delivered every tick)."""
    timer_every: float = 300.0
    """Virtual seconds between two timer invocations (the first is at the first tick)."""
    duplicate: float = 0.5
    """Chance that an event is delivered twice in a row."""
    hold_back: float = 0.25
    """Chance that an event waits for the next tick (so it arrives after later ones)."""
    writable: tuple[str, ...] = ()
    """Names of the scale sets the app may change (default: those tagged enabled)."""
    runtime: service.Runtime | None = None
    """The runtime the functions run on (default: `stack.runtime()`)."""
    check_every_tick: bool = True
    parallel: bool = False
    """Run each tick's deliveries (duplicates too) and its timer invocation at once on
    threads, as one instance running several invocations concurrently does."""
    deliveries: list[Delivery] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.next_timer = self.stack.sim.clock.now()
        self.timer_calls = 0
        self.past_due_calls = 0
        self._lock = threading.Lock()
        self._inbox: list[dict[str, Any]] = []
        self._retry: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        if self.runtime is None:
            self.runtime = self.stack.runtime()
        self.host = Host(self.runtime)
        self.ids = {(v.resource_group.lower(), v.name.lower()): v.id for v in self.stack.sim.state}
        """Scale set ids by (resource group, name), kept after a set is deleted."""
        self.checker = Invariants.watch(
            self.stack.sim, self.stack.store, self.stack.settings, writable=self.writable
        )
        self.stack.sim.add_event_sink(self._receive)

    def close(self) -> None:
        self.stack.sim.remove_event_sink(self._receive)

    def __enter__(self) -> FunctionsDriver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _receive(self, payload: dict[str, Any]) -> None:
        with self._lock:
            self._inbox.append(payload)
            self.received.append(payload)

    # -- the two functions -------------------------------------------------------------

    def event(self, payload: dict[str, Any]) -> None:
        """One delivery to the Event Grid function (raises what the function raises)."""
        self.host.event(payload)

    def timer(self, past_due: bool = False) -> None:
        now = self.stack.sim.clock.now()
        self.timer_calls += 1
        self.past_due_calls += past_due
        self.host.timer(past_due, now=now, period=timedelta(seconds=self.timer_every))

    # -- Event Grid's delivery ---------------------------------------------------------

    def pending(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self._retry)

    def deliver(self, alongside: Callable[[], None] | None = None) -> int:
        """Deliver what is queued: shuffled, some twice, some held back; returns how many.

        `alongside` (the timer's invocation) runs after the deliveries, or with `parallel`
        at the same time as them.
        """
        with self._lock:
            batch, self._inbox = self._inbox, []
        batch, self._retry = self._retry + batch, []
        self.rng.shuffle(batch)
        calls: list[dict[str, Any]] = []
        for payload in batch:
            if self.rng.random() < self.hold_back:
                with self._lock:
                    self._inbox.append(payload)
                continue
            calls += [payload] * (2 if self.rng.random() < self.duplicate else 1)
        if self.parallel:
            self._at_once(calls, alongside)
        else:
            failed: list[str] = []
            for payload in calls:
                if payload["id"] not in failed and not self.deliver_one(payload):
                    failed.append(payload["id"])
                    self._retry.append(payload)
            if alongside is not None:
                alongside()
        return len({payload["id"] for payload in calls})

    def _at_once(self, calls: list[dict[str, Any]], alongside: Callable[[], None] | None) -> None:
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="invocation") as pool:
            attempts = [(payload, pool.submit(self.deliver_one, payload)) for payload in calls]
            timer = pool.submit(alongside) if alongside is not None else None
            failed = {payload["id"]: payload for payload, f in attempts if not f.result(60)}
            if timer is not None:
                timer.result(60)
        self._retry += failed.values()

    def redeliver(self, payloads: Iterable[dict[str, Any]]) -> None:
        """Queue events again, as Event Grid may deliver any event once more, at any time."""
        with self._lock:
            self._inbox.extend(payloads)

    def deliver_one(self, payload: dict[str, Any]) -> bool:
        """One attempt; False when the function asked for a retry (TransientFailure)."""
        operation = (payload.get("data") or {}).get("operationName", "")
        try:
            self.event(payload)
        except service.TransientFailure:
            self._record(payload, operation, retried=True)
            return False
        self._record(payload, operation, retried=False)
        return True

    def _record(self, payload: dict[str, Any], operation: str, *, retried: bool) -> None:
        now = self.stack.sim.clock.now()
        self.deliveries.append(Delivery(payload["id"], operation, now, retried))

    def flush(self) -> None:
        """Deliver everything still queued or held back (no more holding back)."""
        hold, self.hold_back = self.hold_back, 0.0
        try:
            self.deliver()
        finally:
            self.hold_back = hold

    # -- time --------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.stack.sim.clock.now()
        timer = None
        if now >= self.next_timer:
            late = now - self.next_timer >= timedelta(seconds=self.step)  # beyond tick rounding
            timer = functools.partial(self.timer, past_due=late)
            self.next_timer = now + timedelta(seconds=self.timer_every)
        self.deliver(alongside=timer)
        if self.check_every_tick:
            self.check(f"at {self.stack.sim.clock.now().isoformat()}")
        self.stack.sim.advance(self.step)

    @contextmanager
    def events_only(self) -> Iterator[None]:
        """No timer ticks inside: what happens is the Event Grid function's doing alone."""
        due, self.next_timer = self.next_timer, datetime.max.replace(tzinfo=UTC)
        try:
            yield
        finally:
            self.next_timer = due  # the next tick may be past due, as after a host outage

    def until(self, done: Callable[[], bool], *, ticks: int = 200, what: str = "") -> int:
        for count in range(1, ticks + 1):
            self.tick()
            if done():
                return count
        raise AssertionError(f"not reached within {ticks} ticks: {what or done}")

    def until_settled(self, names: Iterable[str] = ("web",), *, ticks: int = 200) -> int:
        """Until nothing is in flight and the named sets (of rg-web) are balanced."""
        count = self.until(
            lambda: self.idle() and all(self.balanced(name) for name in names),
            ticks=ticks,
            what="balanced, nothing in flight",
        )
        self.flush()
        self.check("at the end", settled=True)
        return count

    def until_state(self, state: State, *, name: str = "web", ticks: int = 200) -> OperationRecord:
        """Until the set's latest operation is in `state`; returns that record."""

        def reached() -> bool:
            records = self.records(name)
            return bool(records) and records[-1].state is state

        self.until(reached, ticks=ticks, what=f"an operation in state {state}")
        return self.records(name)[-1]

    # -- checks ------------------------------------------------------------------------

    def check(self, where: str = "", *, settled: bool = False) -> list[OperationRecord]:
        """The never-rules, plus: each app write is one operation step's, sent once."""
        records = self.checker.check(where, settled=settled)
        problems = self.write_problems(records) + self.lock_problems()
        if problems:
            listing = "\n  ".join(problems)
            raise AssertionError(f"broken {where}:\n  {listing}")
        return records

    def lock_problems(self) -> list[str]:
        """No invocation runs between two ticks, so no scale set lock may be held: a lock
        left behind makes every event until its lease ends find the scale set busy."""
        now = self.stack.sim.clock.now()
        problems = []
        for (_, name), scale_set_id in self.ids.items():
            holder = lock_holder(self.stack.store, scale_set_id.lower(), now)
            if holder is not None:
                problems.append(
                    f"the lock of {name} is still held by {holder} after every invocation returned"
                )
        return problems

    def app_writes(self, name: str = "web", resource_group: str = "rg-web") -> list[Any]:
        """The app's accepted writes to one scale set, from armsim's request log."""
        scale_set = self.ids[(resource_group.lower(), name.lower())].lower()
        return [
            r
            for r in self.stack.sim.requests
            if r.operation in APP_WRITES
            and r.principal_id == self.stack.sim.scenario.app_principal_id
            and _under(r.path, scale_set)
            and 200 <= r.status < 300
        ]

    def write_problems(self, records: list[OperationRecord]) -> list[str]:
        """Every accepted write of the app belongs to the operation running at that moment,
        which recorded exactly as many calls of that kind as armsim received: a duplicate or
        reordered event never repeats a step."""
        app = self.stack.sim.scenario.app_principal_id
        sent: dict[tuple[str, str], int] = {}
        problems = []
        by_set: dict[str, list[OperationRecord]] = {}
        for record in records:
            by_set.setdefault(record.scale_set_id.lower(), []).append(record)
        for request in self.stack.sim.requests:
            if request.operation not in APP_WRITES or request.principal_id != app:
                continue
            if not 200 <= request.status < 300:
                continue
            scale_set = next((s for s in by_set if _under(request.path, s)), None)
            started = [r for r in by_set.get(scale_set or "", []) if r.created_at <= request.time]
            if not started:
                problems.append(f"{request.time.isoformat()} {request.operation} {request.path}")
                continue
            owner = max(started, key=lambda r: r.created_at)
            key = (owner.operation_id, APP_WRITES[request.operation])
            sent[key] = sent.get(key, 0) + 1
        for record in records:
            for action in APP_WRITES.values():
                recorded = sum(1 for call in record.arm_calls if call.startswith(action + ":"))
                count = sent.get((record.operation_id, action), 0)
                if count != recorded:
                    problems.append(
                        f"operation {record.operation_id} ({record.state}): armsim received "
                        f"{count} {action} call(s), its record names {recorded}"
                    )
        return problems

    # -- what happened -----------------------------------------------------------------

    def records(self, name: str = "web", resource_group: str = "rg-web") -> list[OperationRecord]:
        """The set's operations, oldest first."""
        key = self.ids[(resource_group.lower(), name.lower())].lower()
        return sorted(
            (OperationRecord.from_json(r.body) for r in self.stack.store.history(key, limit=200)),
            key=lambda r: r.created_at,
        )

    def states(self, name: str = "web", resource_group: str = "rg-web") -> list[State]:
        return [r.state for r in self.records(name, resource_group)]

    def idle(self) -> bool:
        return not self.stack.store.active_operations()

    def balanced(self, name: str = "web", resource_group: str = "rg-web") -> bool:
        counts = self.stack.sim.scale_set(resource_group, name).zone_counts()
        return max(counts.values()) - min(counts.values()) <= 1

    def app_deletes(self) -> list[Any]:
        """armsim's journal entries of VMs the app started deleting."""
        app = self.stack.sim.scenario.app_principal_id
        return [
            c for c in self.stack.sim.history() if c.change == "deleting" and c.principal_id == app
        ]

    def duplicates_delivered(self) -> int:
        """Events the function received more than once (and acknowledged)."""
        seen: dict[str, int] = {}
        for delivery in self.deliveries:
            if not delivery.retried:
                seen[delivery.event_id] = seen.get(delivery.event_id, 0) + 1
        return sum(1 for count in seen.values() if count > 1)


def _under(path: str, scale_set_id: str) -> bool:
    """Whether a request path is the scale set's (lower-case id) or one of its children's."""
    path = path.lower()
    return path == scale_set_id or path.startswith(scale_set_id + "/")
