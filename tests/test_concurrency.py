"""Eight reconcilers at once on the same scale sets: one operation per set, no double scale-out.

Each reconciler is a separate "instance" of the app: its own Store client and Compute adapter
(own connections, own throttling budget), sharing only Azurite and armsim. In every round all
eight are released together by a barrier and each reconciles every scale set, in its own order,
some through the event path (`reconcile`) and some through the timer path (`advance_all`,
`audit`); then virtual time moves on. The invariants (devkit/invariants.py) are checked after
every round, and at the end armsim's request log must show exactly one capacity PATCH per
operation, to that operation's target.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from armsim import ScaleSetSpec, Scenario
from devkit.invariants import Invariants
from devkit.stack import Stack, compute_for, running_stack
from rebalancer.compute.errors import AdapterError
from rebalancer.model import ScaleSetRef
from rebalancer.reconciler import Reconciler
from rebalancer.store import Store, StoreUnavailable
from rebalancer.verdict import Outcome, Result

ENABLED = {"zone-rebalance": "enabled"}
INSTANCES = 8
ROUND_TIMEOUT = 60.0


def fleet() -> Scenario:
    return Scenario(
        scale_sets=(
            ScaleSetSpec("web", "rg-a", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),
            ScaleSetSpec("api", "rg-a", counts={"1": 0, "2": 2, "3": 4}, tags=ENABLED),
            ScaleSetSpec(
                "jobs", "rg-b", mode="Flexible", counts={"1": 1, "2": 1, "3": 4}, tags=ENABLED
            ),
            ScaleSetSpec(
                "cache", "rg-b", mode="Flexible", counts={"1": 2, "2": 4, "3": 7}, tags=ENABLED
            ),
        )
    )


class Instances:
    """Eight app instances driven in lock-step rounds."""

    def __init__(self, stack: Stack, store_factory: Callable[..., Store], seed: int) -> None:
        self.stack = stack
        self.refs = [ScaleSetRef.parse(v.id) for v in stack.sim.state]
        self.reconcilers = [
            # The client retries of a deployed instance: eight clients on one Azurite meet
            # connections it has closed, as a deployed app meets Table Storage's.
            stack.reconciler(
                store=store_factory(retry_total=3), compute=compute_for(stack.sim, stack.settings)
            )
            for _ in range(INSTANCES)
        ]
        self.random = random.Random(seed)
        self.results: list[Result] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        for reconciler in self.reconcilers:
            reconciler.compute.close()

    def round(self, number: int) -> None:
        barrier = threading.Barrier(INSTANCES, timeout=ROUND_TIMEOUT)
        plans = [self._plan(i, number) for i in range(INSTANCES)]
        threads = [
            threading.Thread(target=self._work, args=(barrier, r, p), name=f"instance-{i}")
            for i, (r, p) in enumerate(zip(self.reconcilers, plans, strict=True))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(ROUND_TIMEOUT)
            assert not thread.is_alive(), f"{thread.name} hung in round {number}"
        if self.errors:
            raise AssertionError(f"an instance failed in round {number}") from self.errors[0]

    def _plan(self, instance: int, number: int) -> list[Any]:
        """What one instance does this round: every set in its own order, or a timer tick."""
        if (instance + number) % 4 == 0:
            return ["timer"]
        order = list(self.refs)
        self.random.shuffle(order)
        return order

    def _work(self, barrier: threading.Barrier, reconciler: Reconciler, plan: list[Any]) -> None:
        try:
            barrier.wait()
            results: list[Result] = []
            for item in plan:
                if item == "timer":
                    results += _tick(reconciler)
                else:
                    results.append(_reconcile(reconciler, item))
            with self._lock:
                self.results += results
        except BaseException as error:
            with self._lock:
                self.errors.append(error)


def _reconcile(reconciler: Reconciler, ref: ScaleSetRef) -> Result:
    try:
        return reconciler.reconcile(ref)
    except StoreUnavailable as error:  # the event would be delivered again
        return Result(ref, Outcome.DEFERRED, detail=str(error))
    except AdapterError as error:  # the event would be delivered again
        if not error.retryable:
            raise
        return Result(ref, Outcome.DEFERRED, detail=str(error))


def _tick(reconciler: Reconciler) -> list[Result]:
    """The timer path; a tick Table Storage did not answer is over, the next one runs."""
    try:
        return reconciler.advance_all() + reconciler.audit()
    except StoreUnavailable:
        return []


def balanced(stack: Stack) -> bool:
    for view in stack.sim.state:
        counts = view.zone_counts()
        if max(counts.values()) - min(counts.values()) > 1:
            return False
    return True


@pytest.mark.parametrize("seed", [1, 2])
def test_eight_reconcilers_run_one_operation_per_scale_set_and_scale_out_once(
    store_factory: Callable[..., Store], seed: int
) -> None:
    checker_store = store_factory()
    with running_stack(fleet(), checker_store, max_concurrent_operations="2") as stack:
        checker = Invariants.watch(stack.sim, checker_store, stack.settings)
        instances = Instances(stack, store_factory, seed)
        try:
            for number in range(120):
                instances.round(number)
                checker.check(f"after round {number}")
                if not checker_store.active_operations() and balanced(stack):
                    break
                stack.sim.advance(30)
            else:
                raise AssertionError("the fleet did not settle within 120 rounds")
        finally:
            instances.close()
        records = checker.check("at the end", settled=True)

        # Every set is balanced, by as many operations as moves were needed, all succeeded.
        counts = {v.name: sorted(v.zone_counts().values()) for v in stack.sim.state}
        assert counts == {
            "web": [2, 2, 3],
            "api": [2, 2, 2],
            "jobs": [2, 2, 2],
            "cache": [4, 4, 5],
        }
        per_set = Counter(r.ref.name for r in records)
        assert per_set == {"web": 1, "api": 2, "jobs": 2, "cache": 2}
        assert {r.state.value for r in records} == {"succeeded"}

        # No double scale-out: one PATCH per operation, each to its own target (the checker
        # matched bodies to records); capacities never went above baseline + k.
        app = stack.sim.scenario.app_principal_id
        patches = [r for r in stack.sim.requests if r.method == "PATCH" and r.principal_id == app]
        assert len(patches) == len(records)
        assert sorted(r.body["sku"]["capacity"] for r in patches) == sorted(
            r.target_capacity for r in records
        )

        # The instances did contend: most calls found the lock taken or the work done.
        outcomes = Counter(r.outcome for r in instances.results)
        assert outcomes[Outcome.STARTED] == len(records)
        assert outcomes[Outcome.BUSY] > 0


class _Stalling:
    """A Compute adapter whose capacity PATCH waits (real time) until released: a pass that
    outlives its lock lease, as a long GC pause or a hung connection would make it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.go = threading.Event()

    def set_capacity(self, ref: ScaleSetRef, capacity: int, **kw: Any) -> Any:
        self.entered.set()
        assert self.go.wait(ROUND_TIMEOUT), "never released"
        return self.inner.set_capacity(ref, capacity, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_pass_that_outlives_its_lease_cannot_overwrite_the_next_holder(
    store_factory: Callable[..., Store],
) -> None:
    scenario = Scenario(
        scale_sets=(ScaleSetSpec("web", "rg-a", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),)
    )
    checker_store = store_factory()
    with running_stack(scenario, checker_store) as stack:
        checker = Invariants.watch(stack.sim, checker_store, stack.settings)
        ref = ScaleSetRef.parse(stack.sim.scale_set("rg-a", "web").id)
        stalling = _Stalling(compute_for(stack.sim, stack.settings))
        slow = stack.reconciler(store=store_factory(), compute=stalling)
        fresh = stack.reconciler(
            store=store_factory(), compute=compute_for(stack.sim, stack.settings)
        )
        outcome: list[Result] = []
        worker = threading.Thread(target=lambda: outcome.append(slow.reconcile(ref)))
        worker.start()
        try:
            assert stalling.entered.wait(ROUND_TIMEOUT)  # the intent is on disk, no PATCH yet
            stack.sim.advance(slow.lease.total_seconds() + 60)
            taken = fresh.reconcile(ref)  # the lease ran out: the next instance takes over
            assert taken.outcome is Outcome.ADVANCED
        finally:
            stalling.go.set()
            worker.join(ROUND_TIMEOUT)
        assert not worker.is_alive()
        (late,) = outcome
        assert late.outcome is Outcome.BUSY and "no longer held" in late.detail
        for _ in range(40):
            fresh.reconcile(ref)
            checker.check(f"at {stack.sim.clock.now().isoformat()}", single_scale_out=False)
            if not checker_store.active_operations():
                break
            stack.sim.advance(30)
        (record,) = checker.check("at the end", settled=True, single_scale_out=False)
        assert record.state.value == "succeeded"
        view = stack.sim.scale_set("rg-a", "web")
        assert view.capacity == 7 and sorted(view.zone_counts().values()) == [2, 2, 3]
        app = stack.sim.scenario.app_principal_id
        patches = [r for r in stack.sim.requests if r.method == "PATCH" and r.principal_id == app]
        assert {r.body["sku"]["capacity"] for r in patches} == {record.target_capacity}


class _StallingStore:
    """A Store whose assessment write waits until released: a pass that stalls after its
    operation was written and before its first Azure call."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.go = threading.Event()

    def save_assessment(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.go.wait(ROUND_TIMEOUT), "never released"
        return self.inner.save_assessment(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_pass_whose_lease_ran_out_sends_no_azure_write(
    store_factory: Callable[..., Store],
) -> None:
    scenario = Scenario(
        scale_sets=(ScaleSetSpec("web", "rg-a", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),)
    )
    checker_store = store_factory()
    with running_stack(scenario, checker_store) as stack:
        checker = Invariants.watch(stack.sim, checker_store, stack.settings)
        ref = ScaleSetRef.parse(stack.sim.scale_set("rg-a", "web").id)
        stalling = _StallingStore(store_factory())
        slow = stack.reconciler(store=stalling, compute=compute_for(stack.sim, stack.settings))
        fresh = stack.reconciler(
            store=store_factory(), compute=compute_for(stack.sim, stack.settings)
        )
        outcome: list[Result] = []
        worker = threading.Thread(target=lambda: outcome.append(slow.reconcile(ref)))
        worker.start()
        try:
            assert stalling.entered.wait(ROUND_TIMEOUT)  # operation written, no PATCH yet
            stack.sim.advance(slow.lease.total_seconds() + 60)
            assert fresh.reconcile(ref).outcome is Outcome.ADVANCED  # took over, PATCHed
        finally:
            stalling.go.set()
            worker.join(ROUND_TIMEOUT)
        (late,) = outcome
        assert late.outcome is Outcome.BUSY and "before SetCapacity was sent" in late.detail
        for _ in range(40):
            fresh.reconcile(ref)
            checker.check(f"at {stack.sim.clock.now().isoformat()}")
            if not checker_store.active_operations():
                break
            stack.sim.advance(30)
        (record,) = checker.check("at the end", settled=True)  # one PATCH for the operation
        assert record.state.value == "succeeded"


def test_two_passes_of_one_reconciler_exclude_each_other(store):
    """Concurrent invocations in one worker share a Reconciler: its lock must still admit one."""
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec(
                "web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags={"zone-rebalance": "enabled"}
            ),
        )
    )
    with running_stack(scenario, store) as stack:
        reconciler = stack.reconciler()
        ref = ScaleSetRef.parse(stack.sim.scale_set("rg-web", "web").id)
        # Another pass of the same reconciler holds the lock (as the process-wide owner would).
        first = stack.store.try_acquire(
            ref.key, reconciler.owner, stack.sim.clock.now(), reconciler.lease
        )
        assert first is not None
        result = reconciler.reconcile(ref)
        assert result.outcome is Outcome.BUSY
        assert stack.store.active_operation(ref.key) is None
