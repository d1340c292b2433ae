"""Error codes and injected faults, as azure-mgmt-compute surfaces them."""

from __future__ import annotations

import contextlib

import pytest
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.mgmt.compute.models import Sku, VirtualMachineScaleSetUpdate

from armsim import ArmSim, FaultRule, QuotaSpec, SkuSpec

from .conftest import SimFactory, web_scenario


def capacity(n: int) -> VirtualMachineScaleSetUpdate:
    return VirtualMachineScaleSetUpdate(sku=Sku(capacity=n))


@pytest.mark.parametrize(
    ("rule", "status", "code"),
    [
        (FaultRule("error", operation="vmss.get"), 500, "InternalServerError"),
        (
            FaultRule("error", operation="vmss.get", status=503, code="ServiceUnavailable"),
            503,
            "ServiceUnavailable",
        ),
        (FaultRule("throttle", operation="vmss.get", retry_after=1200), 429, "OperationNotAllowed"),
        (FaultRule("not_found", operation="vmss.get"), 404, "ResourceNotFound"),
        (FaultRule("conflict", operation="vmss.update"), 409, "OperationNotAllowed"),
        (FaultRule("quota", operation="vmss.update"), 409, "OperationNotAllowed"),
        (FaultRule("sku_not_available", operation="vmss.update"), 409, "SkuNotAvailable"),
        (
            FaultRule("linked_authorization_failed", operation="vmss.update"),
            403,
            "LinkedAuthorizationFailed",
        ),
    ],
)
def test_request_faults_answer_with_arm_errors(
    sim: ArmSim, compute, rule: FaultRule, status: int, code: str
) -> None:
    handle = sim.faults.add(rule)
    with pytest.raises(HttpResponseError) as error:
        if rule.operation == "vmss.get":
            compute.virtual_machine_scale_sets.get("rg-web", "web")
        else:
            compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(14))
    assert error.value.status_code == status
    assert error.value.error.code == code
    assert sim.faults.fired(handle) == 1
    assert sim.requests[-1].status == status
    compute.virtual_machine_scale_sets.get("rg-web", "web")  # count=1: the next call is fine


def test_throttle_fault_carries_retry_after_and_the_sdk_retries_it(sim: ArmSim) -> None:
    sim.faults.add(FaultRule("throttle", operation="vmss.get", retry_after=1, count=1))
    patient = sim.compute_client(retry_total=2, retry_backoff_factor=0.01)
    assert patient.virtual_machine_scale_sets.get("rg-web", "web").name == "web"
    statuses = [r.status for r in sim.requests if r.operation == "vmss.get"]
    assert statuses == [429, 200]


def test_throttle_answer_headers(sim: ArmSim, compute) -> None:
    sim.faults.add(FaultRule("throttle", operation="vmss_vm.list", retry_after=1200))
    with pytest.raises(HttpResponseError) as error:
        list(compute.virtual_machine_scale_set_vms.list("rg-web", "web"))
    headers = error.value.response.headers
    assert headers["Retry-After"] == "1200"
    assert "HighCostGet30Min;0" in headers["x-ms-ratelimit-remaining-resource"]
    assert error.value.error.details[0].code == "TooManyRequests"


def test_connection_reset_surfaces_as_a_transport_error(sim: ArmSim, compute) -> None:
    sim.faults.add(FaultRule("reset", operation="vmss.get"))
    with pytest.raises((ServiceRequestError, ServiceResponseError)):
        compute.virtual_machine_scale_sets.get("rg-web", "web")
    assert compute.virtual_machine_scale_sets.get("rg-web", "web").name == "web"
    assert [r.status for r in sim.requests] == [0, 200]


def test_slow_fault_delays_the_answer(sim: ArmSim, compute) -> None:
    sim.faults.add(FaultRule("slow", operation="vmss.get", delay=0.3))
    compute.virtual_machine_scale_sets.get("rg-web", "web")
    assert sim.requests[-1].duration_ms >= 300


def test_probability_and_seed_make_faults_repeatable(make_sim: SimFactory) -> None:
    def run() -> list[int]:
        sim = make_sim(web_scenario(seed=3))
        sim.faults.add(FaultRule("error", operation="vmss.get", probability=0.5, count=None))
        compute = sim.compute_client(retry_total=0)
        for _ in range(12):
            with contextlib.suppress(HttpResponseError):
                compute.virtual_machine_scale_sets.get("rg-web", "web")
        return [r.status for r in sim.requests]

    first, second = run(), run()
    assert first == second
    assert 500 in first and 200 in first


def test_quota_is_checked_from_usage(make_sim: SimFactory) -> None:
    scenario = web_scenario(
        skus=(SkuSpec("Standard_D2s_v5", vcpus=2, family="standardDSv5Family"),),
        quotas=(QuotaSpec("westeurope", "standardDSv5Family", 40),),
    )
    sim = make_sim(scenario)
    compute = sim.compute_client(retry_total=0)
    usage = {u.name.value: u for u in compute.usage.list("westeurope")}
    assert usage["standardDSv5Family"].current_value == 34
    assert usage["standardDSv5Family"].limit == 40
    compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(16))
    with pytest.raises(ResourceExistsError) as error:
        compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(17))
    assert error.value.status_code == 409
    assert "quota" in error.value.message
    assert sim.events[-1]["eventType"] == "Microsoft.Resources.ResourceWriteFailure"


def test_sku_not_offered_in_location(make_sim: SimFactory) -> None:
    scenario = web_scenario(
        skus=(SkuSpec("Standard_D2s_v5", unavailable_locations=("westeurope",)),)
    )
    compute = make_sim(scenario).compute_client(retry_total=0)
    with pytest.raises(HttpResponseError) as error:
        compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(14))
    assert error.value.error.code == "SkuNotAvailable"


def test_held_scale_set_refuses_writes_until_released(sim: ArmSim, compute) -> None:
    sim.actor.hold("rg-web", "web")
    with pytest.raises(HttpResponseError) as error:
        compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(14))
    assert error.value.status_code == 409
    assert "another operation is in progress" in error.value.message
    sim.actor.release("rg-web", "web")
    compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(14))


def test_preempt_fault_cancels_the_operation(sim: ArmSim, compute) -> None:
    sim.faults.add(FaultRule("preempt", operation="vmss.update"))
    poller = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(14))
    sim.clock.advance(5)
    with pytest.raises(HttpResponseError) as error:
        poller.result(timeout=10)
    assert "OperationPreempted" in str(error.value)
    assert poller.status() == "Canceled"


def test_actor_preempts_running_update(sim: ArmSim, compute) -> None:
    poller = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(14))
    assert sim.actor.preempt("rg-web", "web") is True
    with pytest.raises(HttpResponseError):
        poller.result(timeout=10)
    assert sim.operations()[-1].error_code == "OperationPreempted"


def test_allocation_failure_fault_per_zone(sim: ArmSim, compute) -> None:
    sim.faults.add(FaultRule("allocation_failure", zone="1", count=None))
    sim.faults.add(FaultRule("allocation_failure", zone="2", count=None))
    sim.faults.add(FaultRule("allocation_failure", zone="3", count=None))
    poller = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(14))
    sim.clock.advance(60)
    with pytest.raises(HttpResponseError) as error:
        poller.result(timeout=10)
    assert "ZonalAllocationFailed" in str(error.value)


def test_never_healthy_and_unhealthy_faults(sim: ArmSim, compute) -> None:
    sim.faults.add(FaultRule("never_healthy", target="/web", zone="1"))
    sim.faults.add(FaultRule("unhealthy", target="/web", zone="1"))
    compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(15))
    sim.clock.advance(60 + 5400)
    web = sim.scale_set("rg-web", "web")
    assert sorted(v.health for v in web.vms if v.instance_id in ("13", "14")) == [
        "initializing",
        "unhealthy",
    ]


def test_provisioning_failure_fault_fails_the_operation(sim: ArmSim, compute) -> None:
    sim.faults.add(FaultRule("provisioning_failure", code="VMExtensionProvisioningError"))
    poller = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", capacity(14))
    sim.clock.advance(60)
    with pytest.raises(HttpResponseError) as error:
        poller.result(timeout=10)
    assert "VMExtensionProvisioningError" in str(error.value)
    assert sim.scale_set("rg-web", "web").vm("13").provisioning_state == "Failed"


def test_unknown_fault_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        FaultRule("explode")


def test_error_sends_retry_after_only_when_asked(sim: ArmSim, compute) -> None:
    sim.faults.add(FaultRule("error", operation="vmss.get", status=503))
    sim.faults.add(FaultRule("error", operation="vmss.get", status=503, retry_after=7))
    headers = []
    for _ in range(2):
        with pytest.raises(HttpResponseError) as error:
            compute.virtual_machine_scale_sets.get("rg-web", "web")
        headers.append(error.value.response.headers.get("Retry-After"))
    assert headers == [None, "7"]
