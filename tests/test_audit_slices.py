"""Audits larger than one invocation: a checkpoint in Table Storage, a ring that turns.

The whole app through its timer function (decoded by the azure.functions converters), on
armsim (throttling on, virtual time) and Azurite. The app's share of Compute's budget is set
low so that reading 40 small scale sets takes longer than the invocation limit, as 5,000
large ones do at the default share: every wait for the budget moves virtual time on.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from armsim import ArmSim, ScaleSetSpec, Scenario
from devkit.host import Host
from devkit.stack import compute_for, settings_for
from rebalancer.clock import VirtualTime
from rebalancer.model import ScaleSetRef
from rebalancer.service import build_runtime
from rebalancer.store import Store

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

    def __init__(self, sim: ArmSim, store: Store, **env: str) -> None:
        env.setdefault("arm_budget_share", "0.01")
        self.sim = sim
        self.settings = replace(settings_for(sim, **env), function_timeout=LIMIT)
        self.compute = compute_for(sim, self.settings, max_wait=None)
        self.runtime = build_runtime(
            self.settings, store=store, compute=self.compute, clock=VirtualTime(sim.clock)
        )
        self.reconciler = self.runtime.reconciler
        self.reconciler.audit_page = PAGE
        self.host = Host(self.runtime)

    def tick(self) -> timedelta:
        """One timer invocation; how long it took on armsim's clock."""
        started = self.sim.clock.now()
        self.host.timer(now=started, period=TIMER)
        return self.sim.clock.now() - started

    def close(self) -> None:
        self.compute.close()


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
