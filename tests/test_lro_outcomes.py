"""The outcome of the app's own capacity and delete writes, read from their long-running
operations, through the reconciler on armsim and Azurite: an allocation error there backs the
zone off, an extension error is a failed replacement, a failed delete is reported with its
code, and a status poll waits for the `Retry-After` it was answered with."""

from __future__ import annotations

import itertools

import pytest

from armsim import ScaleSetSpec, Scenario, ZoneCapacity
from armsim.faults import FaultRule
from devkit.stack import Drive, running_stack
from rebalancer.lro import PendingCall
from rebalancer.operation import Reason, State
from rebalancer.verdict import Gate

ENABLED = {"zone-rebalance": "enabled"}
MODES = ["Uniform", "Flexible"]
SKU = "Standard_D2s_v5"


def web(mode: str, **options) -> tuple[ScaleSetSpec, ...]:
    counts = {"1": 1, "2": 3, "3": 3}
    return (ScaleSetSpec("web", "rg-web", mode=mode, counts=counts, tags=ENABLED, **options),)


@pytest.mark.parametrize("mode", MODES)
def test_an_allocation_error_named_only_by_the_operation_backs_the_zone_off(store, mode):
    # Zone 1 has no room and strict zone balance allows no other zone: the new VM fails
    # allocation. The VM list shows only `ProvisioningState/failed`; the write's error names
    # ZonalAllocationFailed for that VM.
    scenario = Scenario(
        scale_sets=web(mode, zone_balance=True),
        capacity=(ZoneCapacity("westeurope", SKU, "1", 0),),
        failure_codes_in_lists=(),
    )
    with running_stack(scenario, store) as stack:
        run = Drive(stack)
        run.until_terminal()
        (record,) = run.records()
        assert record.state is State.ROLLED_BACK
        assert Reason.NO_CAPACITY_IN_TARGET_ZONE in [t.reason for t in record.history]
        assert Reason.NEW_VM_FAILED not in [t.reason for t in record.history]
        assert "ended:set_capacity:Failed:ZonalAllocationFailed" in record.arm_calls
        now = stack.sim.clock.now()
        assert store.backoff_until("westeurope", SKU, "1", now) is not None
        assert stack.sim.scale_set("rg-web", "web").zone_counts() == {"1": 1, "2": 3, "3": 3}


@pytest.mark.parametrize("mode", MODES)
def test_an_extension_error_named_only_by_the_operation_is_a_failed_replacement(store, mode):
    # Without overprovisioning: an extra VM would stand in for the one that failed.
    scenario = Scenario(scale_sets=web(mode, overprovision=False), failure_codes_in_lists=())
    with running_stack(scenario, store) as stack:
        stack.sim.faults.add(
            FaultRule("provisioning_failure", code="VMExtensionProvisioningError", count=1)
        )
        run = Drive(stack)
        run.until_terminal()
        record = run.records()[0]
        assert record.state is State.ROLLED_BACK
        assert record.history[1].reason is Reason.NEW_VM_FAILED
        assert "VMExtensionProvisioningError" in record.history[1].detail
        assert "ended:set_capacity:Failed:VMExtensionProvisioningError" in record.arm_calls
        now = stack.sim.clock.now()
        assert store.backoff_until("westeurope", SKU, "1", now) is None


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_delete_is_reported_with_its_code(store, mode):
    with running_stack(Scenario(scale_sets=web(mode)), store) as stack:
        stack.sim.faults.add(
            FaultRule(
                "operation_failure",
                operation="vmss.delete_instances",
                code="InternalExecutionError",
                count=1,
            )
        )
        run = Drive(stack)
        run.until_terminal()
        (record,) = run.records()
        assert "ended:delete_instances:Failed:InternalExecutionError" in record.arm_calls
        assert "the last delete_instances request ended Failed with InternalExecutionError" in (
            record.outcome_detail
        )


def test_status_polls_wait_for_the_retry_after_they_were_answered_with(store):
    scenario = Scenario(scale_sets=web("Uniform"), lro_retry_after=45)
    with running_stack(scenario, store) as stack:
        run = Drive(stack, step=10)
        run.until(lambda: bool(run.records()), what="an operation")
        run.until(lambda: _polls(stack), what="a status poll")
        row = stack.store.active_operation(run.ref().key)
        pending = PendingCall.from_json(row.call)
        first = _polls(stack)[0]
        assert pending.outcome is None  # the VM takes 60 s: still running, asked to wait 45 s
        assert pending.next_poll_at is not None
        assert (pending.next_poll_at - first).total_seconds() == pytest.approx(45, abs=1)
        run.until_terminal()
        gaps = []
        for path in {r.path for r in stack.sim.requests if r.operation == "operation.status"}:
            polls = _polls(stack, path)
            gaps += [(b - a).total_seconds() for a, b in itertools.pairwise(polls)]
        assert gaps and min(gaps) >= 45  # ticks every 10 s, but no poll before it was due


def _polls(stack, path: str | None = None) -> list:
    return [
        r.time
        for r in stack.sim.requests
        if r.operation == "operation.status" and path in (None, r.path)
    ]


def test_a_failed_replacement_is_not_tried_again_before_a_cooldown(store):
    """New VMs whose extension always fails: one operation, then the move waits one cooldown
    (`failed_replacement`) instead of creating and deleting a VM on every pass."""
    with running_stack(Scenario(scale_sets=web("Uniform")), store, cooldown_minutes="60") as stack:
        stack.sim.faults.add(
            FaultRule("provisioning_failure", code="VMExtensionProvisioningError", count=None)
        )
        run = Drive(stack)
        run.until_terminal()
        assert [r.state for r in run.records()] == [State.ROLLED_BACK]
        for _ in range(100):  # 50 minutes
            run.tick()
        assert len(run.records()) == 1
        verdict = run.results[-1].verdict
        assert verdict is not None and verdict.gate is Gate.FAILED_REPLACEMENT
        assert "REBALANCER_COOLDOWN_MINUTES" in verdict.gate_detail
        run.until(lambda: len(run.records()) == 2, ticks=40, what="the move tried again")
