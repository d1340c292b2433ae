"""Compute-shaped token buckets: 429 with Retry-After when enabled, refilled on the clock."""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError

from armsim import ScaleSetSpec

from .conftest import SimFactory, web_scenario


def test_vm_list_bucket_empties_then_refills_on_the_clock(make_sim: SimFactory) -> None:
    sim = make_sim(web_scenario(throttling=True))
    compute = sim.compute_client(retry_total=0)
    for _ in range(30):
        list(compute.virtual_machine_scale_set_vms.list("rg-web", "web"))
    with pytest.raises(HttpResponseError) as error:
        list(compute.virtual_machine_scale_set_vms.list("rg-web", "web"))
    response = error.value.response
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "6"
    assert error.value.error.details[0].target == "HighCostGetVMScaleSetResource"
    # Another scale set has its own per-resource bucket.
    sim.actor.create_scale_set(ScaleSetSpec("other", "rg-web"))
    list(compute.virtual_machine_scale_set_vms.list("rg-web", "other"))
    sim.clock.advance(6)
    list(compute.virtual_machine_scale_set_vms.list("rg-web", "web"))
    charged = sim.requests[-1].policies
    assert "Microsoft.Compute/HighCostGetVMScaleSetResource" in charged


def test_throttling_is_off_by_default(sim, compute) -> None:  # type: ignore[no-untyped-def]
    for _ in range(40):
        compute.virtual_machine_scale_sets.get("rg-web", "web")
    assert {r.status for r in sim.requests} == {200}
    assert sim.requests[-1].policies == (
        "reads",
        "Microsoft.Compute/GetVMScaleSetSubscriptionMaximum",
        "Microsoft.Compute/GetVMScaleSetResource",
    )


def test_scale_set_update_bucket(make_sim: SimFactory) -> None:
    sim = make_sim(web_scenario(throttling=True))
    compute = sim.compute_client(retry_total=0)
    from azure.mgmt.compute.models import Sku, VirtualMachineScaleSetUpdate

    compute.virtual_machine_scale_sets.begin_update(
        "rg-web", "web", VirtualMachineScaleSetUpdate(sku=Sku(capacity=14))
    )
    for _ in range(11):
        compute.virtual_machine_scale_sets.begin_update(
            "rg-web", "web", VirtualMachineScaleSetUpdate(sku=Sku(capacity=14))
        )
    with pytest.raises(HttpResponseError) as error:
        compute.virtual_machine_scale_sets.begin_update(
            "rg-web", "web", VirtualMachineScaleSetUpdate(sku=Sku(capacity=14))
        )
    assert error.value.status_code == 429
    assert int(error.value.response.headers["Retry-After"]) == 15


def test_writes_report_the_recorded_counters_in_todays_style(make_sim: SimFactory) -> None:
    """As recorded (tests/data/real-azure/throttling): windowless names, and every scale set
    write reports the batched-VM budget and `VmssQueuedVMOperations;0`."""
    sim = make_sim(web_scenario(throttling=True))
    compute = sim.compute_client(retry_total=0)
    from azure.mgmt.compute.models import Sku, VirtualMachineScaleSetUpdate

    answers: list[object] = []
    for _ in range(2):
        compute.virtual_machine_scale_sets.begin_update(
            "rg-web",
            "web",
            VirtualMachineScaleSetUpdate(sku=Sku(capacity=13)),
            polling=False,
            raw_response_hook=lambda response: answers.append(response.http_response.headers),
        )
    header = answers[-1]
    assert header["x-ms-ratelimit-remaining-resource"] == (  # type: ignore[index]
        "Microsoft.Compute/VMScaleSetActionsSubscriptionMaximum;1498,"
        "Microsoft.Compute/VMScaleSetActionsResource;10,"
        "Microsoft.Compute/VMScaleSetBatchedVMRequestsSubscriptionMaximum;5998,"
        "Microsoft.Compute/VmssQueuedVMOperations;0"
    )


@pytest.mark.parametrize("throttling", [True, False])
def test_the_legacy_header_style_is_still_there(make_sim: SimFactory, throttling: bool) -> None:
    sim = make_sim(web_scenario(throttling=throttling, throttle_header_style="legacy"))
    compute = sim.compute_client(retry_total=0)
    compute.virtual_machine_scale_sets.get("rg-web", "web")
    list(compute.virtual_machine_scale_set_vms.list("rg-web", "web"))
    assert [r.policies for r in sim.requests] == [
        ("reads", "Microsoft.Compute/GetVMScaleSet3Min"),
        (
            "reads",
            "Microsoft.Compute/HighCostGetVMScaleSet3Min",
            "Microsoft.Compute/HighCostGet30Min",
        ),
    ]
