"""The reconciler against armsim and Azurite, through the real SDK clients."""

from __future__ import annotations

import pytest

from armsim import ScaleSetSpec, Scenario, VmOverride
from tests.stack import Stack, running_stack

ENABLED = {"zone-rebalance": "enabled"}


def run_to_rest(stack: Stack, rg: str, name: str, *, ticks: int = 200, step: float = 30.0) -> None:
    """Reconcile, let virtual time pass, repeat: until no operation is in flight and the
    scale set is balanced, or the tick budget runs out."""
    reconciler = stack.reconciler()
    ref = stack.sim.scale_set(rg, name)
    for _ in range(ticks):
        reconciler.reconcile(_ref(stack, rg, name))
        stack.sim.advance(step)
        if not stack.store.active_operations() and _balanced(stack.counts(rg, name)):
            return
    raise AssertionError(f"{ref.id} did not settle: {stack.counts(rg, name)}")


def _ref(stack: Stack, rg: str, name: str):
    from rebalancer.model import ScaleSetRef

    return ScaleSetRef.parse(stack.sim.scale_set(rg, name).id)


def _balanced(counts: dict[str, int]) -> bool:
    return max(counts.values()) - min(counts.values()) <= 1


@pytest.fixture
def store(store_factory):
    return store_factory()


@pytest.mark.parametrize("mode", ["Uniform", "Flexible"])
def test_1_3_3_ends_balanced_with_one_move(store, mode):
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec("web", "rg-web", mode=mode, counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),
        )
    )
    with running_stack(scenario, store) as stack:
        before = {vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms}
        run_to_rest(stack, "rg-web", "web")
        after = stack.sim.scale_set("rg-web", "web")
        assert sorted(after.zone_counts().values()) == [2, 2, 3]
        assert after.capacity == 7
        assert len(before - {vm.instance_id for vm in after.vms}) == 1  # exactly one move
        (finished,) = store.history(_ref(stack, "rg-web", "web").key)
        assert finished.state == "succeeded"


def test_protected_vms_are_never_deleted(store):
    protected = tuple(VmOverride(instance=str(i), protect_from_scale_in=True) for i in range(2, 6))
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec(
                "web", "rg-web", counts={"1": 0, "2": 2, "3": 6}, tags=ENABLED, overrides=protected
            ),
        )
    )
    with running_stack(scenario, store) as stack:
        protected_ids = {
            vm.instance_id
            for vm in stack.sim.scale_set("rg-web", "web").vms
            if vm.protect_from_scale_in
        }
        assert protected_ids
        for _ in range(80):
            stack.reconciler().reconcile(_ref(stack, "rg-web", "web"))
            stack.sim.advance(30)
        after = stack.sim.scale_set("rg-web", "web")
        remaining = {vm.instance_id for vm in after.vms}
        assert protected_ids <= remaining
        assert after.zone_counts()["1"] >= 2  # the unprotected VMs did move


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


def test_outside_scale_out_mid_operation_supersedes_and_deletes_nothing(store):
    scenario = Scenario(
        scale_sets=(ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),)
    )
    with running_stack(scenario, store) as stack:
        ref = _ref(stack, "rg-web", "web")
        reconciler = stack.reconciler()
        reconciler.reconcile(ref)
        assert store.active_operation(ref.key) is not None
        stack.sim.advance(120)
        stack.sim.actor.set_capacity("rg-web", "web", 12)
        stack.sim.advance(120)
        for _ in range(10):
            reconciler.reconcile(ref)
            stack.sim.advance(30)
        (finished,) = store.history(ref.key)
        assert finished.state == "superseded"
        assert stack.sim.scale_set("rg-web", "web").capacity == 12
        assert not [
            r for r in stack.sim.requests if r.method == "POST" and r.path.endswith("/delete")
        ]


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
        assert spent.writes == 1  # only the audit marker; nothing about the scale sets changed
