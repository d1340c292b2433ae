"""The VM journal, the SKU catalog and write bodies in the request log: what invariant
checkers and the quota check read."""

from __future__ import annotations

from azure.mgmt.compute.models import (
    Sku,
    VirtualMachineScaleSetUpdate,
    VirtualMachineScaleSetVMInstanceRequiredIDs,
)

from armsim import ArmSim, ScaleSetSpec, Scenario, SkuSpec

from .conftest import SimFactory


def test_journal_tells_the_life_of_each_vm_and_who_caused_it(sim: ArmSim, compute) -> None:
    web_id = sim.scale_set("rg-web", "web").id
    compute.virtual_machine_scale_sets.begin_update(
        "rg-web", "web", VirtualMachineScaleSetUpdate(sku=Sku(capacity=14))
    )
    sim.clock.advance(90)
    sim.actor.set_health("rg-web", "web", "13", "unhealthy")
    sim.actor.delete_instances("rg-web", "web", ["12", "13"])
    sim.clock.advance(30)
    changes = [
        (c.instance_id, c.change, c.value, c.principal_id) for c in sim.history(web_id.upper())
    ]
    app, actor = sim.scenario.app_principal_id, sim.scenario.actor_principal_id
    assert changes == [
        ("13", "created", None, app),
        ("13", "provisioned", None, None),
        ("13", "health", "healthy", None),
        ("13", "health", "unhealthy", None),
        ("12", "deleting", None, actor),
        ("13", "deleting", None, actor),
        ("12", "deleted", None, None),
        ("13", "deleted", None, None),
    ]
    deleting_12 = next(c for c in sim.history() if c.change == "deleting" and c.instance_id == "12")
    assert deleting_12.protected is True and deleting_12.health == "healthy"
    assert sim.history("/nothing") == ()


def test_request_log_keeps_write_bodies(sim: ArmSim, compute) -> None:
    compute.virtual_machine_scale_sets.begin_update(
        "rg-web", "web", VirtualMachineScaleSetUpdate(sku=Sku(capacity=14))
    )
    compute.virtual_machine_scale_sets.begin_delete_instances(
        "rg-web", "web", VirtualMachineScaleSetVMInstanceRequiredIDs(instance_ids=["1"])
    )
    writes = [(r.operation, r.body) for r in sim.requests if r.method != "GET"]
    assert writes == [
        ("vmss.update", {"sku": {"capacity": 14}}),
        ("vmss.delete_instances", {"instanceIds": ["1"]}),
    ]
    assert all(r.body is None for r in sim.requests if r.method == "GET")


def test_resource_skus_give_vcpus_family_and_restrictions(make_sim: SimFactory) -> None:
    scenario = Scenario(
        skus=(
            SkuSpec("Standard_D4s_v5", vcpus=4, family="standardDSv5Family"),
            SkuSpec(
                "Standard_F2s_v2",
                vcpus=2,
                family="standardFSv2Family",
                unavailable_locations=("westeurope",),
            ),
        ),
        scale_sets=(ScaleSetSpec("web", "rg", sku="Standard_D4s_v5", counts={"1": 1}),),
    )
    compute = make_sim(scenario).compute_client(retry_total=0)
    skus = {s.name: s for s in compute.resource_skus.list(filter="location eq 'westeurope'")}
    assert set(skus) == {"Standard_D4s_v5", "Standard_F2s_v2"}
    d4 = skus["Standard_D4s_v5"]
    assert d4.family == "standardDSv5Family" and d4.resource_type == "virtualMachines"
    assert {c.name: c.value for c in d4.capabilities}["vCPUs"] == "4"
    assert d4.location_info[0].zones == ["1", "2", "3"]
    assert d4.restrictions == []
    assert skus["Standard_F2s_v2"].restrictions[0].reason_code == "NotAvailableForSubscription"


def test_one_simulator_can_be_reused_with_fresh_scale_sets(sim: ArmSim) -> None:
    sim.actor.set_capacity("rg-web", "web", 14)
    sim.clock.advance(60)
    sim.clear_requests()
    sim.clear_events()
    sim.clear_history()
    assert (sim.requests, sim.events, sim.history()) == ([], [], ())
    sim.actor.create_scale_set(ScaleSetSpec("fresh", "rg-new", counts={"1": 1, "2": 1}))
    assert sim.scale_set("rg-new", "fresh").zone_counts() == {"1": 1, "2": 1, "3": 0}
    import pytest

    from armsim import ScenarioError

    with pytest.raises(ScenarioError, match="mode must be"):
        sim.actor.create_scale_set(ScaleSetSpec("bad", "rg-new", mode="Flex"))
    with pytest.raises(ValueError, match="already exists"):
        sim.actor.create_scale_set(ScaleSetSpec("fresh", "rg-new"))
