"""The pure side of the app's long-running writes: when a status is due, what a failed
capacity write says about its new VMs, and how a failure is reported in the record."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from rebalancer.evaluator import assess
from rebalancer.lro import (
    DELETE_INSTANCES,
    SET_CAPACITY,
    CallOutcome,
    PendingCall,
    reported,
    with_outcome,
)
from rebalancer.operation import OperationPolicy, start
from tests.test_operation import Fleet, vm

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def pending(action: str = SET_CAPACITY, outcome: CallOutcome | None = None) -> PendingCall:
    return PendingCall(
        action, {"action": action, "scale_set": "x", "status_code": 200}, T0, None, outcome
    )


def started(fleet: Fleet):
    inventory = fleet.inventory(T0)
    record, _ = start(inventory, assess(inventory), OperationPolicy(), T0, "op")
    return record


def test_a_status_is_due_at_once_then_only_after_its_retry_after():
    call = pending()
    assert call.due(T0)
    waiting = call.still_running(T0, 45)
    assert not waiting.due(T0 + timedelta(seconds=44))
    assert waiting.due(T0 + timedelta(seconds=45))
    assert call.still_running(T0, None).due(T0)  # no Retry-After: the next pass asks again
    assert not waiting.ended(CallOutcome("Succeeded")).due(T0 + timedelta(hours=1))


def test_a_pending_call_survives_its_json():
    outcome = CallOutcome(
        "Failed", "ZonalAllocationFailed", "no room", {"7": "ZonalAllocationFailed"}
    )
    call = pending(outcome=outcome).still_running(T0, 30)
    assert PendingCall.from_json(call.to_json()) == call


def test_a_failed_vm_without_a_code_takes_the_one_the_write_gives_it():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    record = started(fleet)
    fleet.add(vm("7", "1", state="Failed"), vm("8", "1", state="Failed", failure="Custom"))
    fleet.add(vm("0", "1", state="Failed"))  # in the baseline: not the write's VM
    outcome = CallOutcome("Failed", "ZonalAllocationFailed", "", {"7": "ZonalAllocationFailed"})
    seen = with_outcome(fleet.inventory(T0), record, pending(outcome=outcome)).by_id()
    assert seen["7"].failure == "ZonalAllocationFailed" and seen["7"].allocation_failed
    assert seen["8"].failure == "Custom"  # its own code stands
    assert seen["0"].failure is None


def test_without_details_the_error_code_stands_for_every_failed_new_vm():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    record = started(fleet)
    fleet.add(vm("7", "1", state="Failed"))
    outcome = CallOutcome("Failed", "VMExtensionProvisioningError")
    seen = with_outcome(fleet.inventory(T0), record, pending(outcome=outcome)).by_id()
    assert seen["7"].failure == "VMExtensionProvisioningError" and not seen["7"].allocation_failed


def test_a_delete_or_a_success_changes_no_vm():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    record = started(fleet)
    fleet.add(vm("7", "1", state="Failed"))
    inventory = fleet.inventory(T0)
    failed = CallOutcome("Failed", "ZonalAllocationFailed")
    assert with_outcome(inventory, record, pending(DELETE_INSTANCES, failed)) is inventory
    assert with_outcome(inventory, record, pending(outcome=CallOutcome("Succeeded"))) is inventory
    assert with_outcome(inventory, record, pending()) is inventory


def test_a_failed_write_is_noted_once_and_named_in_the_outcome():
    record = started(Fleet.of({"1": 1, "2": 3, "3": 3}))
    call = pending(DELETE_INSTANCES, CallOutcome("Failed", "InternalExecutionError", "retry"))
    noted = reported(record, call)
    assert noted.arm_calls[-1] == "ended:delete_instances:Failed:InternalExecutionError"
    assert reported(noted, replace(call, reported=True)) == noted
    assert "Unknown" not in reported(record, pending(outcome=CallOutcome("Unknown"))).arm_calls
