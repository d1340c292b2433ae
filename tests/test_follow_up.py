"""A scale set that needs several operations gets them back to back, not one per audit."""

from __future__ import annotations

from armsim import ScaleSetSpec, Scenario
from devkit.stack import running_stack
from devkit.tables import lock_holder
from rebalancer.model import ScaleSetRef


def test_the_next_operation_starts_when_the_last_one_succeeds(store_factory):
    store = store_factory()
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec(
                "web", "rg-web", counts={"1": 0, "2": 4, "3": 4}, tags={"zone-rebalance": "enabled"}
            ),
        )
    )
    with running_stack(scenario, store, audit_interval_minutes="1440") as stack:
        reconciler = stack.reconciler()
        ref = ScaleSetRef.parse(stack.sim.scale_set("rg-web", "web").id)
        reconciler.audit()  # the only audit in this test: it starts the first operation
        assert store.active_operation(ref.key) is not None
        for _ in range(200):  # timer ticks between audits only advance in-flight operations
            reconciler.advance_all()
            stack.sim.advance(30)
            if not store.active_operations():
                break
        counts = stack.counts("rg-web", "web")
        assert sorted(counts.values()) == [2, 3, 3], counts
        states = [row.state for row in store.history(ref.key)]
        assert states == ["succeeded"] * 2


def test_a_pass_that_wrote_steps_leaves_the_lock_free(store_factory):
    """Each step's write renews the lock row; the pass must still release it at the end, or
    the event that reports the step's result finds the scale set busy for a whole lease."""
    store = store_factory()
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
        for _ in range(6):
            reconciler.reconcile(ref)
            assert lock_holder(store, ref.key, stack.sim.clock.now()) is None
            stack.sim.advance(60)
