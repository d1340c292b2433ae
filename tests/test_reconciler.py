"""The reconciler's read-only paths against armsim and Azurite, through the real SDK clients.

The moves themselves, every scenario of the issue, are in test_reconciler_scenarios.py."""

from __future__ import annotations

import pytest

from armsim import ScaleSetSpec, Scenario
from tests.stack import running_stack

ENABLED = {"zone-rebalance": "enabled"}


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
        assert spent.writes == 1  # only the audit marker; nothing about the scale sets changed
