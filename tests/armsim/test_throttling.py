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
    assert error.value.error.details[0].target == "HighCostGetVMScaleSet3Min"
    # Another scale set has its own per-resource bucket.
    sim.actor.create_scale_set(ScaleSetSpec("other", "rg-web"))
    list(compute.virtual_machine_scale_set_vms.list("rg-web", "other"))
    sim.clock.advance(6)
    list(compute.virtual_machine_scale_set_vms.list("rg-web", "web"))
    charged = sim.requests[-1].policies
    assert "Microsoft.Compute/HighCostGetVMScaleSet3Min" in charged


def test_throttling_is_off_by_default(sim, compute) -> None:  # type: ignore[no-untyped-def]
    for _ in range(40):
        compute.virtual_machine_scale_sets.get("rg-web", "web")
    assert {r.status for r in sim.requests} == {200}
    assert sim.requests[-1].policies == ("reads", "Microsoft.Compute/GetVMScaleSet3Min")


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
