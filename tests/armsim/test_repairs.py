"""armsim's automatic instance repairs: the three repair actions on the clock, silently.

Microsoft's "Automatic instance repairs for Azure Virtual Machine Scale Sets": an instance
reporting Unhealthy or Unknown is repaired once the grace period (default 30 minutes) has
passed since its last state change; Replace deletes it and creates a new one (new name and
instance id), at most 5% of the instances at a time, never a protected instance. Repairs are
not requests sent to Resource Manager: no Event Grid event.
"""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError
from azure.mgmt.compute.models import AutomaticRepairsPolicy, VirtualMachineScaleSetUpdate

from armsim import ScaleSetSpec, Scenario, VmOverride
from armsim.repairs import SWEEP_SECONDS

GRACE = 30 * 60


def scenario(**options) -> Scenario:
    spec = ScaleSetSpec(
        "web",
        "rg-web",
        overprovision=False,
        counts={"1": 2, "2": 2, "3": 2},
        overrides=(VmOverride(instance="5", protect_from_scale_in=True),),
        **options,
    )
    return Scenario(scale_sets=(spec,))


def test_the_policy_is_written_with_azures_defaults_and_served_in_the_model(make_sim):
    sim = make_sim(scenario())
    compute = sim.compute_client(retry_total=0)
    assert (
        "automatic_repairs_policy"
        not in compute.virtual_machine_scale_sets.get("rg-web", "web").as_dict()
    )
    enabled = AutomaticRepairsPolicy(enabled=True)
    update = VirtualMachineScaleSetUpdate(automatic_repairs_policy=enabled)
    poller = compute.virtual_machine_scale_sets.begin_update("rg-web", "web", update)
    sim.advance(10)
    poller.result()
    policy = compute.virtual_machine_scale_sets.get("rg-web", "web").automatic_repairs_policy
    assert (policy.enabled, policy.grace_period, policy.repair_action) == (True, "PT30M", "Replace")
    too_short = AutomaticRepairsPolicy(enabled=True, grace_period="PT5M")
    with pytest.raises(HttpResponseError) as error:
        compute.virtual_machine_scale_sets.begin_update(
            "rg-web", "web", VirtualMachineScaleSetUpdate(automatic_repairs_policy=too_short)
        )
    assert error.value.status_code == 400 and "PT10M and PT90M" in str(error.value)


def test_replace_deletes_an_unhealthy_vm_and_creates_a_new_one_silently(make_sim):
    sim = make_sim(scenario())
    sim.repairs.enable("rg-web", "web")
    sim.actor.set_health("rg-web", "web", "0", "unhealthy")
    sim.actor.set_health("rg-web", "web", "5", "unhealthy")  # protected: never repaired
    sim.clear_events()
    sim.advance(SWEEP_SECONDS)  # seeded a week ago: the grace period is long over
    (repair,) = sim.repairs.repairs
    assert (repair.instance_id, repair.action, repair.replacement) == ("0", "Replace", "6")
    web = sim.scale_set("rg-web", "web")
    assert web.capacity == 6
    assert web.vm("0").provisioning_state == "Deleting"
    assert (web.vm("6").zone, web.vm("6").provisioning_state) == ("1", "Creating")
    sim.advance(60)
    web = sim.scale_set("rg-web", "web")
    assert "0" not in {vm.instance_id for vm in web.vms}
    assert web.vm("6").health == "initializing"
    sim.advance(30)
    assert sim.scale_set("rg-web", "web").vm("6").health == "healthy"
    assert web.vm("5").health == "unhealthy"
    sim.flush_events()
    assert sim.events == []  # repairs are the platform's: no Event Grid event
    changes = [c for c in sim.history() if c.instance_id in ("0", "6")]
    assert {c.principal_id for c in changes} == {None}
    assert [c.change for c in changes if c.value == "repair"] == ["deleting", "created"]


def test_a_new_vm_is_repaired_only_after_its_grace_period(make_sim):
    sim = make_sim(scenario(new_vm_health="unhealthy"))
    sim.repairs.enable("rg-web", "web", grace_period="PT10M")
    sim.actor.set_capacity("rg-web", "web", 7)
    sim.advance(60 + 10 * 60 - SWEEP_SECONDS)  # provisioned at 60 s, unhealthy at 90 s
    assert sim.repairs.repairs == []
    sim.advance(2 * SWEEP_SECONDS)
    (repair,) = sim.repairs.repairs
    assert (repair.instance_id, repair.replacement) == ("6", "7")


def test_at_most_one_vm_is_repaired_at_a_time_below_twenty(make_sim):
    sim = make_sim(scenario(new_vm_health="unhealthy"))
    sim.repairs.enable("rg-web", "web")
    for instance in ("0", "1", "2"):
        sim.actor.set_health("rg-web", "web", instance, "unknown")
    sim.advance(SWEEP_SECONDS)
    assert [r.instance_id for r in sim.repairs.repairs] == ["0"]
    sim.advance(SWEEP_SECONDS)  # the replacement is still being created
    assert [r.instance_id for r in sim.repairs.repairs] == ["0"]
    sim.advance(2 * SWEEP_SECONDS)
    assert [r.instance_id for r in sim.repairs.repairs] == ["0", "1"]


@pytest.mark.parametrize(("action", "state"), [("Reimage", "Updating"), ("Restart", "Succeeded")])
def test_reimage_and_restart_keep_the_vm(make_sim, action, state):
    sim = make_sim(scenario())
    sim.repairs.enable("rg-web", "web", repair_action=action)
    sim.actor.set_health("rg-web", "web", "2", "unhealthy")
    sim.advance(SWEEP_SECONDS)
    (repair,) = sim.repairs.repairs
    assert (repair.instance_id, repair.action, repair.replacement) == ("2", action, None)
    vm = sim.scale_set("rg-web", "web").vm("2")
    assert (vm.provisioning_state, vm.power_state, vm.health) == (state, "starting", None)
    sim.advance(120 + 30)
    vm = sim.scale_set("rg-web", "web").vm("2")
    assert (vm.provisioning_state, vm.power_state, vm.health) == ("Succeeded", "running", "healthy")
    assert len(sim.scale_set("rg-web", "web").vms) == 6
