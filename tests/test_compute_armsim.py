"""The Compute adapter against armsim, through the real azure-mgmt-compute client over HTTPS.

Time is armsim's virtual clock, shared with the adapter (`VirtualTime`), so throttling waits and
long-running operations cost no real time.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from armsim import ArmSim, FaultRule, QuotaSpec, ScaleSetSpec, Scenario, SkuSpec, VmOverride
from armsim.errors import ArmError
from rebalancer.budget import Budget, parse_remaining_header
from rebalancer.clock import VirtualTime
from rebalancer.compute import (
    AdapterError,
    ArmCall,
    ArmConfig,
    ComputeAdapter,
    ErrorKind,
    OperationState,
    Quota,
    ScaleSetGone,
)
from rebalancer.evaluator import Decision, assess
from rebalancer.model import OrchestrationMode, ScaleSetRef

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def adapter_for(sim: ArmSim, budget: Budget | None = None, **config: Any) -> ComputeAdapter:
    config.setdefault("ca_cert", sim.ca_cert_path)
    settings = ArmConfig(subscription_id=sim.subscription_id, endpoint=sim.endpoint, **config)
    return ComputeAdapter(settings, sim.credential, clock=VirtualTime(sim.clock), budget=budget)


def ref(sim: ArmSim, group: str, name: str) -> ScaleSetRef:
    return ScaleSetRef(sim.subscription_id, group, name)


def operations(sim: ArmSim) -> Counter[str]:
    return Counter(record.operation for record in sim.requests)


UNIFORM = ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3})
FLEXIBLE = ScaleSetSpec(
    "flex",
    "rg-flex",
    mode="Flexible",
    counts={"1": 1, "2": 3, "3": 3},
    overrides=(VmOverride(zone="2", count=3, protect_from_scale_in=True),),
)


# --- reading ------------------------------------------------------------------------------


def test_uniform_inventory_is_one_get_and_one_paged_list() -> None:
    with ArmSim.start(Scenario(page_size=2, scale_sets=(UNIFORM,))) as sim:
        with adapter_for(sim) as adapter:
            inventory = adapter.read_inventory(ref(sim, "RG-WEB", "web"), NOW)
        assert inventory.scale_set.mode is OrchestrationMode.UNIFORM
        assert inventory.observed_at == NOW
        assert sorted(i.id for i in inventory.instances) == [str(n) for n in range(7)]
        assert Counter(i.zone for i in inventory.instances) == {"1": 1, "2": 3, "3": 3}
        # 7 VMs in pages of 2: four pages of ONE list, and no GET per VM.
        assert operations(sim) == {"vmss.get": 1, "vmss_vm.list": 4}
        assert all(r.query.get("$expand") == "instanceView" for r in sim.requests[1:])
        assert assess(inventory).decision is Decision.MOVE


def test_the_sdk_log_level_decides_whether_each_read_is_logged(monkeypatch) -> None:
    """Under the Functions worker's root logger (INFO, every record sent to the host),
    azure-core's HTTP logging writes two records per read; at the app's default level,
    `REBALANCER_SDK_LOG_LEVEL=WARNING`, none."""
    from rebalancer.service import LIBRARY_LOGGERS, library_log_level

    for name in LIBRARY_LOGGERS:  # restored after the test
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)
    root.addHandler(handler)
    try:
        with ArmSim.start(Scenario(scale_sets=(UNIFORM,))) as sim, adapter_for(sim) as adapter:
            counted = {}
            for level in ("INFO", "WARNING"):
                library_log_level(level)
                records.clear()
                adapter.read_inventory(ref(sim, "rg-web", "web"), NOW)
                counted[level] = sum(r.name.startswith("azure.") for r in records)
    finally:
        root.removeHandler(handler)
    assert counted == {"INFO": 4, "WARNING": 0}  # a GET and a list: request and answer each


def test_flexible_inventory_reads_protection_of_planned_sources_only() -> None:
    with ArmSim.start(Scenario(page_size=3, scale_sets=(FLEXIBLE,))) as sim:
        protected = {
            vm.instance_id for vm in sim.scale_set("rg-flex", "flex").vms if vm.zone == "2"
        }
        with adapter_for(sim) as adapter:
            inventory = adapter.read_inventory(ref(sim, "rg-flex", "flex"), NOW, to_act=False)
        assert inventory.scale_set.mode is OrchestrationMode.FLEXIBLE
        assert {i.id for i in inventory.instances} == {
            vm.instance_id for vm in sim.scale_set("rg-flex", "flex").vms
        }
        for instance in inventory.instances:
            if instance.id in protected:
                assert instance.protect_from_scale_in, instance.id
        # The plan avoids zone 2's protected VMs and takes a verified one from zone 3.
        (move,) = assess(inventory).moves
        assert move.from_zone == "3" and move.to_zone == "1"
        assert move.source not in protected
        calls = operations(sim)
        assert calls["vm.list"] == 3  # 7 VMs in pages of 3, one filtered list
        assert calls["vmss_vm.get"] <= len(protected) + 1  # planned sources, not every VM
        vm_list = next(r for r in sim.requests if r.operation == "vm.list")
        assert vm_list.query["$expand"] == "instanceView"
        assert "virtualMachineScaleSet/id" in vm_list.query["$filter"]


def test_flexible_protection_left_unread_is_unknown_and_a_read_is_reused() -> None:
    """Past the read limit a possible source is not taken for protected (an operation's own
    new VM must stay deletable), only kept out of the plan; a read is reused for a while."""
    spec = ScaleSetSpec(
        "flex",
        "rg-flex",
        mode="Flexible",
        counts={"1": 1, "2": 1, "3": 6},
        overrides=(VmOverride(zone="3", count=5, protect_from_scale_in=True),),
    )
    with ArmSim.start(Scenario(scale_sets=(spec,))) as sim:
        flex = ref(sim, "rg-flex", "flex")
        with adapter_for(sim, flexible_protection_reads=2) as adapter:
            inventory = adapter.read_inventory(flex, NOW)
            unknown = [i for i in inventory.instances if i.protection_unknown]
            assert unknown and not any(i.protected for i in unknown)
            assert operations(sim)["vmss_vm.get"] == 2
            assert all(m.source not in {i.id for i in unknown} for m in assess(inventory).moves)
        with adapter_for(sim) as adapter:
            first = adapter.read_inventory(flex, NOW)
            reads = operations(sim)["vmss_vm.get"]
            again = adapter.read_inventory(flex, NOW)
            assert operations(sim)["vmss_vm.get"] == reads  # nothing read twice
            assert not any(i.protection_unknown for i in first.instances)
            (move,) = assess(again).moves
            unprotected = {vm.instance_id for vm in sim.scale_set("rg-flex", "flex").vms}
            unprotected -= {
                vm.instance_id
                for vm in sim.scale_set("rg-flex", "flex").vms
                if vm.protect_from_scale_in
            }
            assert move.source in unprotected


def test_list_scale_sets_is_zonal_and_scoped_case_insensitively() -> None:
    scenario = Scenario(
        page_size=2,
        scale_sets=(
            UNIFORM,
            FLEXIBLE,
            ScaleSetSpec("regional", "rg-web", zones=(), counts={"": 2}),
            ScaleSetSpec("other", "rg-other", counts={"1": 1, "2": 1}),
        ),
    )
    with ArmSim.start(scenario) as sim, adapter_for(sim) as adapter:
        everything = {s.ref.name for s in adapter.list_scale_sets(None)}
        sim.clear_requests()
        scoped = {s.ref.name for s in adapter.list_scale_sets(["RG-WEB", "rg-Flex"])}
        paths = [r.path.lower() for r in sim.requests if r.method == "GET"]
    assert everything == {"web", "flex", "other"}
    assert scoped == {"web", "flex"}
    # A scoped app's role covers only its resource groups: it never lists the subscription.
    assert paths and all("/resourcegroups/" in path for path in paths)


def test_audit_reads_every_set_once_with_bounded_concurrency() -> None:
    small = [
        ScaleSetSpec(f"s{n:02d}", f"rg-{n % 3}", counts={"1": 1, "2": n % 3, "3": 1})
        for n in range(12)
    ]
    sets = (*small, FLEXIBLE)
    with ArmSim.start(Scenario(page_size=5, scale_sets=sets)) as sim:
        with adapter_for(sim, audit_concurrency=4) as adapter:
            results = adapter.audit(None, NOW)
        assert len(results) == 13
        assert not [r for r in results if isinstance(r, AdapterError)]
        calls = operations(sim)
        assert calls["vmss.list_all"] == 3  # 13 sets in pages of 5
        assert calls["vmss.get"] == 0  # list_all already returned the models
        assert calls["vmss_vm.list"] == 12


def test_missing_scale_set_is_gone() -> None:
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,))) as sim, adapter_for(sim) as adapter:
        with pytest.raises(ScaleSetGone) as caught:
            adapter.read_inventory(ref(sim, "rg-web", "nope"), NOW)
        assert caught.value.kind is ErrorKind.NOT_FOUND
        assert caught.value.ref == ref(sim, "rg-web", "nope")
        with pytest.raises(ScaleSetGone):
            adapter.set_capacity(ref(sim, "rg-web", "nope"), 3)


# --- acting -------------------------------------------------------------------------------


def test_capacity_change_returns_at_once_and_resumes_from_its_record() -> None:
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,))) as sim:
        target = ref(sim, "rg-web", "web")
        with adapter_for(sim) as adapter:
            call = adapter.set_capacity(target, 9)
            assert call.async_operation_url and call.request_id and call.correlation_id
            assert call.client_request_id
            assert adapter.operation_status(call).state is OperationState.IN_PROGRESS
            record = json.dumps(call.to_record())
        # Another invocation, another adapter: it knows only the recorded call.
        sim.advance(600)
        with adapter_for(sim) as later:
            resumed = ArmCall.from_record(json.loads(record))
            assert resumed == call
            assert later.operation_status(resumed).state is OperationState.SUCCEEDED
            # Absolute capacity: repeating the call changes nothing.
            again = later.set_capacity(target, 9)
            sim.advance(60)
            assert later.operation_status(again).state is OperationState.SUCCEEDED
        view = sim.scale_set("rg-web", "web")
        assert view.capacity == 9 and len(view.vms) == 9
        assert sim.requests[-1].operation == "operation.status"
        # The write's event names our request, so the app can tell its own writes apart.
        ours = [e for e in sim.events if e["data"]["correlationId"] == call.correlation_id]
        assert [e["eventType"] for e in ours] == ["Microsoft.Resources.ResourceWriteSuccess"]
        assert ours[0]["data"]["httpRequest"]["clientRequestId"] == call.client_request_id
        assert call.correlation_id != again.correlation_id


def test_capacity_write_is_conditional_on_the_etag_it_was_decided_on() -> None:
    """A PATCH decided on a read that someone else's write has overtaken is refused (412)
    instead of overwriting their change; the next read gives the new ETag."""
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,))) as sim, adapter_for(sim) as adapter:
        target = ref(sim, "rg-web", "web")
        seen = adapter.get_scale_set(target)
        assert seen.etag
        sim.actor.set_capacity("rg-web", "web", 10)  # autoscale, after our read
        with pytest.raises(AdapterError) as refused:
            adapter.set_capacity(target, 8, etag=seen.etag)
        assert refused.value.kind is ErrorKind.CONFLICT
        assert refused.value.code == "PreconditionFailed" and refused.value.status == 412
        assert sim.scale_set("rg-web", "web").capacity == 10
        fresh = adapter.get_scale_set(target)
        assert fresh.etag != seen.etag and fresh.capacity == 10
        adapter.set_capacity(target, 11, etag=fresh.etag)
        assert sim.scale_set("rg-web", "web").capacity == 11


def test_a_write_answered_with_location_only_is_polled_not_taken_as_done() -> None:
    """The ARM async spec allows a 200/201/202 with only `Location`: that is not finished."""
    scenario = Scenario(scale_sets=(UNIFORM,), lro_headers="location")
    with ArmSim.start(scenario) as sim, adapter_for(sim) as adapter:
        call = adapter.set_capacity(ref(sim, "rg-web", "web"), 9)
        assert call.status_code == 200 and call.async_operation_url is None
        assert call.location_url and not call.synchronous
        assert adapter.operation_status(call).state is OperationState.IN_PROGRESS
        sim.advance(600)
        assert adapter.operation_status(call).state is OperationState.SUCCEEDED


def test_retry_after_on_status_polls_is_passed_on() -> None:
    scenario = Scenario(scale_sets=(UNIFORM,), lro_retry_after=17)
    with ArmSim.start(scenario) as sim, adapter_for(sim) as adapter:
        call = adapter.set_capacity(ref(sim, "rg-web", "web"), 9)
        status = adapter.operation_status(call)
        assert status.state is OperationState.IN_PROGRESS and status.retry_after == 17
        sim.advance(600)
        done = adapter.operation_status(call)
        assert done.state is OperationState.SUCCEEDED and done.retry_after is None


def test_delete_instances_uniform_ids_and_flexible_names_idempotently() -> None:
    with ArmSim.start(Scenario(scale_sets=(UNIFORM, FLEXIBLE))) as sim, adapter_for(sim) as adapter:
        uniform = ref(sim, "rg-web", "web")
        call = adapter.delete_instances(uniform, ["5", "6"])
        assert call.instance_ids == ("5", "6")
        sim.advance(120)
        assert adapter.operation_status(call).state is OperationState.SUCCEEDED
        assert {vm.instance_id for vm in sim.scale_set("rg-web", "web").vms} == {
            "0",
            "1",
            "2",
            "3",
            "4",
        }
        repeat = adapter.delete_instances(uniform, ["5", "6"])
        assert repeat.synchronous
        assert adapter.operation_status(repeat).state is OperationState.SUCCEEDED
        partly = adapter.delete_instances(uniform, ["4", "5"])
        assert partly.instance_ids == ("4",)

        flexible = ref(sim, "rg-flex", "flex")
        name = next(vm.name for vm in sim.scale_set("rg-flex", "flex").vms if vm.zone == "3")
        flex_call = adapter.delete_instances(flexible, [name])
        sim.advance(120)
        assert adapter.operation_status(flex_call).state is OperationState.SUCCEEDED
        assert name not in {vm.name for vm in sim.scale_set("rg-flex", "flex").vms}
        assert sim.scale_set("rg-flex", "flex").capacity == 6


def test_a_delete_is_not_sent_when_the_capacity_changed_since_the_decision() -> None:
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,))) as sim, adapter_for(sim) as adapter:
        web = ref(sim, "rg-web", "web")
        sim.actor.set_capacity("rg-web", "web", 6)  # someone else, after the decision on 7
        with pytest.raises(AdapterError) as caught:
            adapter.delete_instances(web, ["0"], expect_capacity=7)
        assert (caught.value.kind, caught.value.code) == (ErrorKind.CONFLICT, "CapacityChanged")
        assert "capacity is 6, not the 7" in str(caught.value)
        assert not [r for r in sim.requests if r.operation == "vmss.delete_instances"]
        assert sim.scale_set("rg-web", "web").capacity == 6
        call = adapter.delete_instances(web, ["0"], expect_capacity=6)
        assert call.instance_ids == ("0",)
        assert sim.scale_set("rg-web", "web").capacity == 5


def test_a_throttled_capacity_read_does_not_hold_the_delete_back() -> None:
    rule = FaultRule("throttle", operation="vmss.get", retry_after=1200, count=None)
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,), faults=(rule,))) as sim:
        with adapter_for(sim, max_wait=60) as adapter:
            call = adapter.delete_instances(ref(sim, "rg-web", "web"), ["0"], expect_capacity=7)
        assert call.instance_ids == ("0",)
        assert [r.status for r in sim.requests if r.operation == "vmss.get"] == [429]
        assert sim.scale_set("rg-web", "web").capacity == 6


def test_allocation_failure_is_read_from_the_failed_operation() -> None:
    # Without overprovisioning: every VM the write created is one the error must name.
    scenario = Scenario(scale_sets=(replace(UNIFORM, overprovision=False),))
    with ArmSim.start(scenario) as sim, adapter_for(sim) as adapter:
        for zone in ("1", "2", "3"):
            sim.actor.set_zone_room("westeurope", "Standard_D2s_v5", zone, 0)
        call = adapter.set_capacity(ref(sim, "rg-web", "web"), 8)
        sim.advance(300)
        status = adapter.operation_status(call)
    assert status.state is OperationState.FAILED
    assert status.error is not None and status.error.kind is ErrorKind.NO_CAPACITY
    assert status.error.code in ("ZonalAllocationFailed", "AllocationFailed")
    failed = [vm.instance_id for vm in sim.scale_set("rg-web", "web").vms if vm.failure_code]
    assert sorted(vm for vm, _ in status.failed_instances) == sorted(failed) and failed
    assert {code for _, code in status.failed_instances} <= {
        "ZonalAllocationFailed",
        "AllocationFailed",
    }


def test_preempted_operation_is_a_conflict() -> None:
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,))) as sim, adapter_for(sim) as adapter:
        call = adapter.set_capacity(ref(sim, "rg-web", "web"), 9)
        assert sim.actor.preempt("rg-web", "web")
        status = adapter.operation_status(call)
    assert status.state is OperationState.FAILED
    assert status.error is not None and status.error.kind is ErrorKind.CONFLICT
    assert status.error.code == "OperationPreempted"


def test_another_operation_in_progress_is_a_conflict() -> None:
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,))) as sim, adapter_for(sim) as adapter:
        sim.actor.hold("rg-web", "web")
        with pytest.raises(AdapterError) as caught:
            adapter.set_capacity(ref(sim, "rg-web", "web"), 9)
    assert caught.value.kind is ErrorKind.CONFLICT
    assert caught.value.ref == ref(sim, "rg-web", "web")


AUTHORIZATION_FAILED = (
    "The client 'x' with object id 'x' does not have authorization to perform action "
    "'Microsoft.Compute/virtualMachineScaleSets/write' over scope '/subscriptions/s' or the "
    "scope is invalid."
)


@pytest.mark.parametrize(
    ("rule", "kind", "extra"),
    [
        (FaultRule("quota", operation="vmss.update"), ErrorKind.QUOTA, {}),
        (FaultRule("sku_not_available", operation="vmss.update"), ErrorKind.SKU_UNAVAILABLE, {}),
        (
            FaultRule("linked_authorization_failed", operation="vmss.update"),
            ErrorKind.FORBIDDEN,
            {"missing_action": "Microsoft.Network/virtualNetworks/subnets/join/action"},
        ),
        (
            FaultRule(
                "error",
                operation="vmss.update",
                status=403,
                code="AuthorizationFailed",
                message=AUTHORIZATION_FAILED,
            ),
            ErrorKind.FORBIDDEN,
            {"missing_action": "Microsoft.Compute/virtualMachineScaleSets/write"},
        ),
        (FaultRule("conflict", operation="vmss.update"), ErrorKind.CONFLICT, {}),
        (
            FaultRule("error", operation="vmss.update", status=400, code="InvalidParameter"),
            ErrorKind.INVALID,
            {},
        ),
        (
            FaultRule(
                "error", operation="vmss.update", status=503, code="ServiceUnavailable", count=None
            ),
            ErrorKind.TRANSIENT,
            {},
        ),
        (FaultRule("reset", operation="vmss.update", count=None), ErrorKind.TRANSIENT, {}),
        (
            FaultRule(
                "error", operation="vmss.update", status=401, code="ExpiredAuthenticationToken"
            ),
            ErrorKind.UNAUTHENTICATED,
            {},
        ),
        (FaultRule("not_found", operation="vmss.update"), ErrorKind.NOT_FOUND, {"status": 404}),
    ],
)
def test_failures_are_classified(rule: FaultRule, kind: ErrorKind, extra: dict[str, str]) -> None:
    scenario = Scenario(scale_sets=(UNIFORM,), faults=(rule,))
    with (
        ArmSim.start(scenario) as sim,
        adapter_for(sim) as adapter,
        pytest.raises(AdapterError) as caught,
    ):
        adapter.set_capacity(ref(sim, "rg-web", "web"), 9)
    error = caught.value
    assert error.kind is kind, error
    assert error.ref == ref(sim, "rg-web", "web")
    for name, value in extra.items():
        assert getattr(error, name) == value
    if rule.kind != "reset":
        assert error.request_id


def test_failed_operation_codes_are_classified() -> None:
    rule = FaultRule(
        "operation_failure",
        operation="vmss.update",
        code="OverconstrainedZonalAllocationRequest",
        message="Allocation failed. VM(s) with the following constraints cannot be allocated, "
        "because the condition is too restrictive: zone 2.",
    )
    scenario = Scenario(scale_sets=(UNIFORM,), faults=(rule,))
    with ArmSim.start(scenario) as sim, adapter_for(sim) as adapter:
        call = adapter.set_capacity(ref(sim, "rg-web", "web"), 9)
        sim.advance(300)
        status = adapter.operation_status(call)
    assert status.state is OperationState.FAILED
    assert status.error is not None
    assert (status.error.kind, status.error.zone) == (ErrorKind.NO_CAPACITY, "2")


def test_transient_errors_are_retried_within_the_call() -> None:
    rule = FaultRule("error", operation="vmss_vm.list", status=503, code="ServiceUnavailable")
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,), faults=(rule,))) as sim:
        with adapter_for(sim) as adapter:
            inventory = adapter.read_inventory(ref(sim, "rg-web", "web"), NOW)
        assert len(inventory.instances) == 7
        assert [r.status for r in sim.requests if r.operation == "vmss_vm.list"] == [503, 200]


# --- throttling ---------------------------------------------------------------------------


def test_short_retry_after_is_waited_on_the_clock() -> None:
    rule = FaultRule("throttle", operation="vmss_vm.list", retry_after=20)
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,), faults=(rule,))) as sim:
        start = sim.clock.now()
        with adapter_for(sim, max_wait=60) as adapter:
            inventory = adapter.read_inventory(ref(sim, "rg-web", "web"), NOW)
        assert len(inventory.instances) == 7
        assert (sim.clock.now() - start).total_seconds() >= 20
        assert [r.status for r in sim.requests if r.operation == "vmss_vm.list"] == [429, 200]


def test_long_retry_after_is_not_slept_through() -> None:
    rule = FaultRule("throttle", operation="vmss_vm.list", retry_after=1200, count=None)
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,), faults=(rule,))) as sim:
        start = sim.clock.now()
        with adapter_for(sim, max_wait=60) as adapter:
            with pytest.raises(AdapterError) as caught:
                adapter.read_inventory(ref(sim, "rg-web", "web"), NOW)
            assert caught.value.kind is ErrorKind.THROTTLED
            assert caught.value.retry_after == 1200
            # The next call of the same kind is not even sent: the hold is remembered.
            with pytest.raises(AdapterError) as again:
                adapter.read_inventory(ref(sim, "rg-web", "web"), NOW)
            assert again.value.kind is ErrorKind.THROTTLED
            assert again.value.code == "ClientThrottlingBudget"
            assert again.value.retry_after == pytest.approx(1200, abs=1)
        assert (sim.clock.now() - start).total_seconds() < 60
        assert [r.status for r in sim.requests if r.operation == "vmss_vm.list"] == [429]


def test_throttled_audit_stops_reading_and_reports_when_to_come_back() -> None:
    sets = tuple(ScaleSetSpec(f"s{n}", "rg", counts={"1": 1, "2": 1}) for n in range(6))
    rule = FaultRule("throttle", operation="vmss_vm.list", retry_after=900, count=None)
    with ArmSim.start(Scenario(scale_sets=sets, faults=(rule,))) as sim:
        with adapter_for(sim, audit_concurrency=1, max_wait=30) as adapter:
            results = adapter.audit(None, NOW)
        assert all(isinstance(r, AdapterError) for r in results)
        assert {r.kind for r in results} == {ErrorKind.THROTTLED}
        assert {r.ref.name for r in results} == {f"s{n}" for n in range(6)}
        assert operations(sim)["vmss_vm.list"] == 1


def test_large_audit_stays_within_the_budget_without_a_single_429() -> None:
    """1,000 scale sets, Compute-shaped limits on in armsim: the budget paces the audit."""
    sets = tuple(
        ScaleSetSpec(f"s{n:04d}", f"rg-{n % 10}", counts={"1": 1, "2": 1}) for n in range(1000)
    )
    scenario = Scenario(scale_sets=sets, throttling=True, page_size=200)
    with ArmSim.start(scenario) as sim:
        start = sim.clock.now()
        with adapter_for(sim, audit_concurrency=8, max_wait=600) as adapter:
            results = adapter.audit(None, NOW)
        elapsed = (sim.clock.now() - start).total_seconds()
        statuses = Counter(r.status for r in sim.requests)
    errors = [r for r in results if isinstance(r, AdapterError)]
    assert not errors, errors[:3]
    assert len(results) == 1000
    assert statuses.get(429, 0) == 0
    # 20% of the subscription's high-cost bucket (1080, +360/min) paces the reads: the audit
    # takes about (1000 - 216) / 72 per minute of (virtual) time, and no faster.
    assert elapsed >= (1000 - 0.2 * 1080) / (0.2 * 360 / 60) * 0.95


def test_without_the_budget_the_same_kind_of_audit_is_throttled() -> None:
    """The control for the test above: no client-side limits, and armsim answers 429."""
    sets = tuple(ScaleSetSpec(f"s{n:03d}", "rg", counts={"1": 1, "2": 1}) for n in range(300))
    with ArmSim.start(Scenario(scale_sets=sets, throttling=True, page_size=200)) as sim:
        unlimited = HeaderBlindBudget(share=1.0, policies={})
        with adapter_for(sim, budget=unlimited, audit_concurrency=8, max_wait=600) as adapter:
            adapter.audit(None, NOW)
        assert Counter(r.status for r in sim.requests)[429] > 0


class HeaderBlindBudget(Budget):
    """The budget without its reading of `x-ms-ratelimit-remaining-*` (the control)."""

    def observe_headers(self, kind: Any, headers: Any, now: float, **_: Any) -> float | None:
        return None


def others_use_the_subscription_bucket(sim: ArmSim, leave: int) -> None:
    """Other tools of the user spend the subscription's high-cost VMSS bucket down to about
    `leave` calls, as ARM would count them (through armsim's own throttle)."""
    policy = {
        "current": "Microsoft.Compute/HighCostGetVMScaleSetSubscriptionMaximum",
        "legacy": "Microsoft.Compute/HighCostGet30Min",
    }[sim.throttle.style]
    for call in range(100_000):
        try:
            headers, _ = sim.throttle.charge(
                "vmss_vm.list", sim.subscription_id, f"/others/{call}", sim.clock.now()
            )
        except ArmError:
            sim.advance(1)  # their reads bucket ran dry first; it refills faster
            continue
        remaining = parse_remaining_header(headers["x-ms-ratelimit-remaining-resource"])
        if remaining[policy] <= leave:
            break
    else:
        raise AssertionError("the bucket never ran down")
    sim.advance(10)  # let the subscription's read bucket refill; the high-cost one barely does


@pytest.mark.parametrize("reads_headers", [True, False])
def test_remaining_headers_slow_the_audit_before_azure_says_no(reads_headers: bool) -> None:
    sets = tuple(ScaleSetSpec(f"s{n:03d}", "rg", counts={"1": 1, "2": 1}) for n in range(150))
    with ArmSim.start(Scenario(scale_sets=sets, throttling=True, page_size=200)) as sim:
        # Half of Azure's limits: fast enough that the static buckets alone would overrun
        # what the others left (at 20% the ARM read share paces the audit below the refill).
        budget = Budget(share=0.5) if reads_headers else HeaderBlindBudget(share=0.5)
        with adapter_for(sim, budget=budget, audit_concurrency=4, max_wait=3600) as adapter:
            adapter.read_inventory(ref(sim, "rg", "s000"), NOW)  # sees the bucket nearly full
            others_use_the_subscription_bucket(sim, leave=40)
            sim.clear_requests()
            results = adapter.audit(None, NOW)
        throttled = Counter(r.status for r in sim.requests)[429]
    assert len(results) == 150
    if reads_headers:
        assert throttled == 0
        assert all(not isinstance(r, AdapterError) for r in results)
    else:
        assert throttled > 0  # without the headers, its own 20% budget alone is too late


# --- quota --------------------------------------------------------------------------------


def test_quota_of_a_size_in_a_location_is_read_once_and_cached() -> None:
    scenario = Scenario(
        skus=(
            SkuSpec("Standard_D4s_v5", vcpus=4, family="standardDSv5Family"),
            SkuSpec(
                "Standard_E2s_v5",
                vcpus=2,
                family="standardESv5Family",
                unavailable_locations=("westeurope",),
            ),
        ),
        quotas=(
            QuotaSpec("westeurope", "standardDSv5Family", 40),
            QuotaSpec("westeurope", "cores", 100),
        ),
        scale_sets=(ScaleSetSpec("web", "rg-web", sku="Standard_D4s_v5", counts={"1": 3, "2": 3}),),
    )
    with ArmSim.start(scenario) as sim, adapter_for(sim, usage_cache_ttl=300) as adapter:
        quota = adapter.quota("westeurope", "standard_d4s_v5")
        assert quota == Quota(
            family="standardDSv5Family",
            used_vcpus=24,
            limit_vcpus=40,
            vcpus_per_vm=4,
            regional_used_vcpus=24,
            regional_limit_vcpus=100,
        )
        assert quota.headroom_vms == 4
        assert adapter.quota("westeurope", "Standard_D4s_v5") == quota
        with pytest.raises(AdapterError) as caught:
            adapter.quota("westeurope", "Standard_E2s_v5")
        assert caught.value.kind is ErrorKind.SKU_UNAVAILABLE
        assert operations(sim) == {"sku.list": 1, "usage.list": 1}
        sim.advance(301)  # usages expire, SKUs do not
        adapter.quota("westeurope", "Standard_D4s_v5")
        assert operations(sim) == {"sku.list": 1, "usage.list": 2}
        sku_list = next(r for r in sim.requests if r.operation == "sku.list")
        assert sku_list.query["$filter"] == "location eq 'westeurope'"


# --- the transport and the environment ----------------------------------------------------

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")
PROXY_VARIABLES += ("all_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture
def refusing_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """An HTTPS proxy on loopback that refuses every tunnel, with the request lines it got;
    no other proxy setting in the environment."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    asked: list[str] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                asked.append(connection.recv(4096).decode("latin-1").split("\r\n")[0])
                connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        yield asked
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_the_environments_proxy_is_used(refusing_proxy: list[str]) -> None:
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,))) as sim, adapter_for(sim) as adapter:
        with pytest.raises(AdapterError) as caught:
            adapter.read_inventory(ref(sim, "rg-web", "web"), NOW)
        assert caught.value.kind is ErrorKind.TRANSIENT
        host = sim.endpoint.split("://", 1)[1].rstrip("/")
        assert refusing_proxy
        assert all(line.startswith(f"CONNECT {host} HTTP/") for line in refusing_proxy)
        assert sim.requests == []


def test_no_proxy_is_honoured_and_the_environment_is_read_once(
    refusing_proxy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transport reads the proxy settings for the endpoint once, when it is built:
    requests would scan the whole environment again on every request."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,))) as sim, adapter_for(sim) as adapter:
        adapter.read_inventory(ref(sim, "rg-web", "web"), NOW)
        monkeypatch.delenv("NO_PROXY")  # a worker's environment does not change under it
        adapter.read_inventory(ref(sim, "rg-web", "web"), NOW)
        assert refusing_proxy == []
        assert operations(sim) == {"vmss.get": 2, "vmss_vm.list": 2}


def test_the_environments_ca_bundle_verifies_without_a_configured_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with ArmSim.start(Scenario(scale_sets=(UNIFORM,))) as sim:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", sim.ca_cert_path)
        with adapter_for(sim, ca_cert=None) as adapter:
            adapter.read_inventory(ref(sim, "rg-web", "web"), NOW)
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
        with adapter_for(sim, ca_cert=None) as adapter, pytest.raises(AdapterError):
            adapter.read_inventory(ref(sim, "rg-web", "web"), NOW)
