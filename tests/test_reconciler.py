"""The reconciler's read-only paths against armsim and Azurite, through the real SDK clients.

The moves themselves, every scenario of the issue, are in test_reconciler_scenarios.py."""

from __future__ import annotations

import pytest

from armsim import ScaleSetSpec, Scenario
from devkit.stack import running_stack
from rebalancer.model import ScaleSetRef

ENABLED = {"zone-rebalance": "enabled"}
BALANCED = {"1": 2, "2": 2, "3": 3}


@pytest.fixture
def store(store_factory):
    return store_factory()


def test_audit_mode_changes_nothing(store):
    scenario = Scenario(
        scale_sets=(ScaleSetSpec("web", "rg-web", counts={"1": 0, "2": 3, "3": 3}, tags=ENABLED),)
    )
    with running_stack(scenario, store, mode="audit") as stack:
        results = stack.reconciler().audit()
        (result,) = results
        assert result.verdict is not None
        assert result.verdict.decision == "wait"
        assert result.verdict.reason == "mode_audit"
        stack.sim.advance(600)
        assert stack.counts("rg-web", "web") == {"1": 0, "2": 3, "3": 3}
        assert not any(r.method in ("PATCH", "POST", "PUT", "DELETE") for r in stack.sim.requests)


def test_untagged_scale_set_is_audited_only(store):
    scenario = Scenario(
        scale_sets=(ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3}),)
    )
    with running_stack(scenario, store) as stack:
        (result,) = stack.reconciler().audit()
        assert result.verdict is not None and result.verdict.reason == "not_opted_in"
        assert store.active_operations() == []


def test_auditing_a_balanced_fleet_again_writes_nothing(store):
    scenario = Scenario(
        scale_sets=tuple(
            ScaleSetSpec(f"web{i}", "rg-web", counts={"1": 2, "2": 2, "3": 3}, tags=ENABLED)
            for i in range(5)
        )
    )
    with running_stack(scenario, store) as stack:
        reconciler = stack.reconciler()
        first = reconciler.audit()
        assert {r.verdict.reason for r in first if r.verdict} == {"balanced"}
        stack.sim.advance(300)
        before = store.stats
        again = reconciler.audit()
        spent = store.stats - before
        assert len(again) == 5
        # Only the audit's own row (taken, then its last checkpoint): nothing about the sets.
        assert spent.writes == 2


def test_auditing_a_balanced_fleet_again_reads_the_store_per_page_not_per_scale_set(store):
    """What the audit needs of each scale set from Table Storage (is an operation in flight,
    did the assessment change) comes from two queries per page, not two point reads per set:
    the CPU of an audit tick over a large fleet was mostly those point reads."""
    scenario = Scenario(
        scale_sets=tuple(
            ScaleSetSpec(f"web{i:02d}", f"rg-{i % 3}", counts=BALANCED, tags=ENABLED)
            for i in range(12)
        )
    )
    with running_stack(scenario, store) as stack:
        reconciler = stack.reconciler(audit_page=5)
        first = reconciler.audit()
        assert {r.verdict.reason for r in first if r.verdict} == {"balanced"}
        stack.sim.advance(300)
        before = store.stats
        again = reconciler.audit()
        spent = store.stats - before
        assert [r.verdict.reason for r in again if r.verdict] == ["balanced"] * 12
        # Taking the audit reads its row; then each of the 3 pages: one query of the
        # operations in flight, one of the stored assessments.
        assert spent.reads == 1 + 3 * 2


class _AutoscaleRacesTheWrite:
    """The app's Compute adapter, with autoscale scaling the set out right after the app read
    it and before its capacity PATCH arrives."""

    def __init__(self, inner, sim, capacity):  # type: ignore[no-untyped-def]
        self.inner, self.sim, self.capacity, self.raced = inner, sim, capacity, False

    def set_capacity(self, ref, capacity, **kw):  # type: ignore[no-untyped-def]
        if not self.raced:
            self.raced = True
            self.sim.actor.set_capacity(ref.resource_group, ref.name, self.capacity)
        return self.inner.set_capacity(ref, capacity, **kw)

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


def test_a_scale_out_overtaken_by_autoscale_never_overwrites_it(store):
    """Without If-Match the app's absolute PATCH (7 -> 8) would land after autoscale's 7 -> 10
    and turn it into a scale-in of two VMs that Azure picks. With the ETag of its read, the
    PATCH is refused (412), autoscale's capacity stays, and the operation stands down."""
    scenario = Scenario(
        scale_sets=(ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),)
    )
    with running_stack(scenario, store) as stack:
        racing = _AutoscaleRacesTheWrite(stack.compute, stack.sim, 10)
        reconciler = stack.reconciler(compute=racing)
        ref = ScaleSetRef.parse(stack.sim.scale_set("rg-web", "web").id)
        reconciler.reconcile(ref)
        assert racing.raced
        refused = [r for r in stack.sim.requests if r.operation == "vmss.update"]
        assert [r.status for r in refused] == [412]
        for _ in range(20):
            stack.sim.advance(60)
            reconciler.reconcile(ref)
        assert stack.sim.scale_set("rg-web", "web").capacity == 10
        updates = [r for r in stack.sim.requests if r.operation == "vmss.update"]
        assert all(r.status == 412 for r in updates)
        assert not [r for r in stack.sim.requests if r.method == "POST" and r.status < 400]
