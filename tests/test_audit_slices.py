"""Audits larger than one invocation: a checkpoint in Table Storage, a ring that turns.

The whole app through its timer function (decoded by the azure.functions converters), on
armsim (throttling on, virtual time) and Azurite. The app's share of Compute's budget is set
low so that reading 40 small scale sets takes longer than the invocation limit, as 5,000
large ones do at the default share: every wait for the budget moves virtual time on.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from armsim import ArmSim, ScaleSetSpec, Scenario
from devkit.azurite import AzuriteQueue
from devkit.host import Host
from devkit.stack import compute_for, settings_for
from rebalancer.clock import VirtualTime
from rebalancer.follow_up_queue import FollowUpQueue
from rebalancer.model import ScaleSetRef
from rebalancer.service import build_runtime
from rebalancer.store import Store
from rebalancer.sweep import Continuation

LIMIT = timedelta(minutes=2)
TIMER = timedelta(minutes=5)
PAGE = 5
SETS = 40


class Crash(BaseException):
    """The process dies here: nothing in the app catches it."""


def _fleet(count: int = SETS) -> Scenario:
    return Scenario(
        scale_sets=tuple(
            ScaleSetSpec(
                f"vmss{i:03d}",
                f"rg-{i // 10}",
                mode="Uniform" if i % 2 == 0 else "Flexible",
                counts={"1": 1, "2": 1, "3": 1},
            )
            for i in range(count)
        ),
        throttling=True,
    )


class App:
    """One app instance (its own reconciler and adapter) on the shared armsim and store."""

    def __init__(
        self, sim: ArmSim, store: Store, follow_ups: FollowUpQueue | None = None, **env: str
    ) -> None:
        env.setdefault("arm_budget_share", "0.01")
        self.sim = sim
        self.settings = replace(settings_for(sim, **env), function_timeout=LIMIT)
        self.compute = compute_for(sim, self.settings, max_wait=None)
        self.runtime = build_runtime(
            self.settings,
            store=store,
            compute=self.compute,
            clock=VirtualTime(sim.clock),
            follow_ups=follow_ups,
        )
        self.reconciler = self.runtime.reconciler
        self.reconciler.audit_page = PAGE
        self.host = Host(self.runtime)

    def tick(self) -> timedelta:
        """One timer invocation; how long it took on armsim's clock."""
        started = self.sim.clock.now()
        self.host.timer(now=started, period=TIMER)
        return self.sim.clock.now() - started

    def deliver(self, message: Any) -> timedelta:
        """One delivery of a queue message to the queue function, as the host makes it."""
        started = self.sim.clock.now()
        self.host.follow_up(message.content, message.id)
        return self.sim.clock.now() - started

    def close(self) -> None:
        self.compute.close()


class Queue:
    """The follow-up queue on Azurite: the app's sender, and the host's side that reads it."""

    def __init__(self, server: AzuriteQueue) -> None:
        from azure.storage.queue import QueueClient, TextBase64DecodePolicy

        self.name = f"a{uuid.uuid4().hex[:12]}"
        self.sender = FollowUpQueue(self.name, connection_string=server.connection_string)
        self.inbox = QueueClient.from_connection_string(
            server.connection_string, self.name, message_decode_policy=TextBase64DecodePolicy()
        )

    def visible(self) -> list[Any]:
        """Every message visible now, taken off the queue (the host deletes what it ran)."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            taken = list(self.inbox.receive_messages(max_messages=32))
        except ResourceNotFoundError:  # nothing was ever sent
            return []
        for message in taken:
            self.inbox.delete_message(message)
        return taken

    def close(self) -> None:
        self.sender.close()
        self.inbox.close()


@pytest.fixture(scope="module")
def azurite_queue() -> Iterator[AzuriteQueue]:
    with AzuriteQueue() as server:
        yield server


@pytest.fixture
def queue(azurite_queue: AzuriteQueue) -> Iterator[Queue]:
    opened = Queue(azurite_queue)
    yield opened
    opened.close()


def _next_tick(sim: ArmSim, first: datetime) -> None:
    """On to the timer's next occurrence (every 5 minutes from the first tick)."""
    elapsed = sim.clock.now() - first
    periods = elapsed // TIMER + 1
    sim.advance((first + periods * TIMER - sim.clock.now()).total_seconds())


def _reads(sim: ArmSim) -> Counter[str]:
    """VM list requests per scale set (lower-cased name): what reading its inventory costs."""
    counted: Counter[str] = Counter()
    for record in sim.requests:
        if record.operation == "vmss_vm.list" and record.status == 200:
            counted[record.path.lower().split("/virtualmachinescalesets/")[1].split("/")[0]] += 1
        elif record.operation == "vm.list" and record.status == 200:
            wanted = record.query.get("$filter", "").lower()
            counted[wanted.rsplit("/virtualmachinescalesets/", 1)[-1].split("'")[0]] += 1
    return counted


def _keys(sim: ArmSim) -> list[str]:
    return [ScaleSetRef.parse(view.id).key for view in sim.state]


def test_an_audit_longer_than_an_invocation_continues_from_its_checkpoint(store_factory):
    store = store_factory()
    with ArmSim.start(_fleet()) as sim:
        app = App(sim, store)
        try:
            first = sim.clock.now()
            durations = []
            for _ in range(12):
                durations.append(app.tick())
                if all(store.last_assessment(key) is not None for key in _keys(sim)):
                    break
                _next_tick(sim, first)
        finally:
            app.close()
        assert all(d <= LIMIT for d in durations), (
            f"every invocation must end within host.json's {LIMIT}: {durations}"
        )
        assert len(durations) >= 2, "the fleet is meant to need more than one invocation"
        assert all(store.last_assessment(key) is not None for key in _keys(sim))
        reads = _reads(sim)
        assert sorted(reads) == sorted(f"vmss{i:03d}" for i in range(SETS))
        assert set(reads.values()) == {1}, f"each scale set read once in the pass: {reads}"


def test_a_crash_mid_audit_loses_at_most_the_page_in_hand(store_factory):
    store = store_factory()
    with ArmSim.start(_fleet()) as sim:
        app = App(sim, store)
        calls = Counter[str]()
        original = app.compute.read_inventory

        def dies_on_the_twelfth(ref: ScaleSetRef, now: datetime, **kwargs: Any) -> Any:
            calls["read"] += 1
            if calls["read"] == 12:  # two pages of five checkpointed, the third in hand
                raise Crash
            return original(ref, now, **kwargs)

        app.compute.read_inventory = dies_on_the_twelfth  # type: ignore[method-assign]
        first = sim.clock.now()
        try:
            with pytest.raises(Crash):
                app.tick()
        finally:
            app.close()
        read_before = _reads(sim)
        # A new process; the timer fires again on schedule.
        again = App(sim, store)
        try:
            for _ in range(12):
                _next_tick(sim, first)
                again.tick()
                if all(store.last_assessment(key) is not None for key in _keys(sim)):
                    break
        finally:
            again.close()
        reads = _reads(sim)
        assert all(store.last_assessment(key) is not None for key in _keys(sim))
        read_twice = sorted(name for name, count in reads.items() if count > 1)
        assert len(read_twice) <= PAGE, (
            f"{len(read_before)} read before the crash; read again after it: {read_twice}"
        )
        assert sum(reads.values()) <= SETS + PAGE


def test_the_ring_turns_so_no_scale_set_starves(store_factory, caplog):
    """Audits due every 5 minutes, a pass needing several invocations: each pass picks up
    where the last one ended, and every scale set is read once per pass, none skipped."""
    store = store_factory()
    with ArmSim.start(_fleet()) as sim:
        app = App(sim, store, audit_interval_minutes="5")
        first = sim.clock.now()
        read_at: dict[str, list[datetime]] = {}
        try:
            with caplog.at_level(logging.INFO, logger="rebalancer"):
                for _ in range(14):
                    seen = len(sim.requests)
                    assert app.tick() <= LIMIT
                    for name in _reads_since(sim, seen):
                        read_at.setdefault(name, []).append(sim.clock.now())
                    _next_tick(sim, first)
        finally:
            app.close()
        counts = {name: len(times) for name, times in read_at.items()}
        assert len(counts) == SETS, f"never read: {SETS - len(counts)} scale sets"
        assert max(counts.values()) - min(counts.values()) <= 1, counts
        assert min(counts.values()) >= 2, "at least two passes in 14 ticks"
        gaps = [b - a for times in read_at.values() for a, b in itertools.pairwise(times)]
        assert max(gaps) <= 4 * TIMER, f"a scale set waited {max(gaps)} between two reads"
        assert "audit_slower_than_interval" in caplog.text


def _reads_since(sim: ArmSim, seen: int) -> list[str]:
    names = []
    for record in sim.requests[seen:]:
        if record.status != 200:
            continue
        if record.operation == "vmss_vm.list":
            names.append(record.path.lower().split("/virtualmachinescalesets/")[1].split("/")[0])
        elif record.operation == "vm.list":
            wanted = record.query.get("$filter", "").lower()
            names.append(wanted.rsplit("/virtualmachinescalesets/", 1)[-1].split("'")[0])
    return names


def test_two_invocations_never_run_the_same_audit_slice(store_factory):
    store = store_factory()
    with ArmSim.start(_fleet(6)) as sim:
        a, b = App(sim, store), App(sim, store)
        try:
            now = sim.clock.now()
            held = store.take_audit("instance-a", now, timedelta(minutes=5), empty=lambda: "{}")
            assert held is not None
            assert (
                store.take_audit("instance-b", now, timedelta(minutes=5), empty=lambda: "{}")
                is None
            )
            busy = b.reconciler.audit_slice(now + LIMIT)
            assert busy.busy and busy.results == []
            assert _reads(sim) == Counter(), "the second invocation read nothing"
            sim.advance(301)  # a's lease ran out (it died): b takes over
            resumed = b.reconciler.audit_slice(sim.clock.now() + LIMIT)
            assert not resumed.busy and len(resumed.results) == 6
            with pytest.raises(Exception, match="no longer held"):
                store.save_audit(held, "{}", sim.clock.now(), timedelta(minutes=5))
        finally:
            a.close()
            b.close()


def test_a_slice_out_of_time_is_continued_at_once_through_the_queue(store_factory, queue):
    """One timer tick starts the pass; each slice that runs out of time sends a continuation
    the queue function runs at once, until the pass is done; then nothing more is sent."""
    store = store_factory()
    with ArmSim.start(_fleet()) as sim:
        app = App(sim, store, queue.sender)
        try:
            durations = [app.tick()]
            continuations = 0
            for _ in range(12):
                waiting = queue.visible()
                if all(store.last_assessment(key) is not None for key in _keys(sim)):
                    break
                assert len(waiting) == 1, (
                    f"the pass is not done after {len(durations)} invocation(s): one "
                    f"continuation must be on the queue, found {len(waiting)}"
                )
                assert Continuation.names(waiting[0].content), waiting[0].content
                continuations += 1
                durations.append(app.deliver(waiting[0]))
        finally:
            app.close()
        assert all(store.last_assessment(key) is not None for key in _keys(sim))
        assert continuations >= 1, "the fleet is meant to need more than one invocation"
        assert all(d <= LIMIT for d in durations), durations
        assert waiting == [], "a pass that is done sends no continuation"
        reads = _reads(sim)
        assert set(reads.values()) == {1}, f"each scale set read once in the pass: {reads}"


def test_a_continuation_runs_once_and_never_starts_a_pass(store_factory, queue):
    """A copy delivered again, or one a timer tick's slice overtook, reads nothing and sends
    nothing: one chain per pass. Nor does a late one start the next pass."""
    store = store_factory()
    with ArmSim.start(_fleet(2 * SETS)) as sim:
        app = App(sim, store, queue.sender)
        first = sim.clock.now()
        try:
            app.tick()
            (sent,) = queue.visible()
            app.deliver(sent)
            (following,) = queue.visible()
            seen = len(sim.requests)
            app.deliver(sent)  # the same message again (a redelivery)
            assert len(sim.requests) == seen, "a copy of a continuation read Azure again"
            assert queue.visible() == []
            _next_tick(sim, first)
            app.tick()  # the timer's slice overtakes the continuation still waiting
            (after_tick,) = queue.visible()
            seen = len(sim.requests)
            app.deliver(following)
            assert len(sim.requests) == seen, "an overtaken continuation read Azure again"
            assert queue.visible() == []
            last = after_tick
            for _ in range(12):
                app.deliver(last)
                waiting = queue.visible()
                if not waiting:
                    break
                (last,) = waiting
            assert all(store.last_assessment(key) is not None for key in _keys(sim))
            seen = len(sim.requests)
            app.deliver(last)  # late: the pass it continued is done
            assert len(sim.requests) == seen, "a late continuation started a new pass"
            assert queue.visible() == []
        finally:
            app.close()


def test_a_continuation_names_what_is_wrong():
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    message = Continuation(moment, 3, moment)
    assert Continuation.from_json(message.to_json()) == message
    assert Continuation.names(message.to_json())
    assert not Continuation.names('{"scaleSet": "s", "operation": "o", "seq": 1, "due": "x"}')
    with pytest.raises(ValueError, match="lacks slices"):
        Continuation.from_json('{"auditPass": "2026-01-01T00:00:00+00:00", "due": "2026"}')
    with pytest.raises(ValueError, match="no time zone"):
        Continuation.from_json('{"auditPass": "2026-01-01T00:00:00", "slices": 1, "due": "x"}')
