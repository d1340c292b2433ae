"""Health as the app reads it: the extension's binary and rich modes, and a read path that
never surfaces `vmHealth`, through armsim, the real azure-mgmt-compute client and the adapter."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from armsim import ArmSim, ScaleSetSpec, Scenario
from rebalancer.clock import VirtualTime
from rebalancer.compute import ArmConfig, ComputeAdapter
from rebalancer.evaluator import Decision, Reason, assess
from rebalancer.model import Health, ScaleSetRef

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def adapter_for(sim: ArmSim) -> ComputeAdapter:
    config = ArmConfig(
        subscription_id=sim.subscription_id, endpoint=sim.endpoint, ca_cert=sim.ca_cert_path
    )
    return ComputeAdapter(config, sim.credential, clock=VirtualTime(sim.clock))


def unbalanced(mode: str, **kw: object) -> ScaleSetSpec:
    return ScaleSetSpec("web", "rg", mode=mode, counts={"1": 1, "2": 3, "3": 3}, **kw)


@pytest.mark.parametrize("mode", ["Uniform", "Flexible"])
def test_a_read_path_without_vm_health_is_a_named_skip(mode: str) -> None:
    other = "Flexible" if mode == "Uniform" else "Uniform"
    scenario = Scenario(scale_sets=(unbalanced(mode),), vm_health_in_lists=(other,))
    with ArmSim.start(scenario) as sim, adapter_for(sim) as adapter:
        ref = ScaleSetRef(sim.subscription_id, "rg", "web")
        inventory = adapter.read_inventory(ref, NOW)
        assert {i.health for i in inventory.instances} == {Health.NOT_REPORTED}
        result = assess(inventory)
        assert result.decision is Decision.SKIP and result.reason is Reason.HEALTH_NOT_REPORTED
        assert "$expand=instanceView" in result.detail


@pytest.mark.parametrize(("states", "warming"), [("rich", "initializing"), ("binary", "unhealthy")])
def test_binary_health_reads_a_warming_vm_unhealthy(states: str, warming: str) -> None:
    # Not overprovisioned, so the one new VM is instance 7.
    spec = unbalanced("Uniform", health_states=states, new_vm_health="healthy", overprovision=False)
    with ArmSim.start(Scenario(scale_sets=(spec,))) as sim, adapter_for(sim) as adapter:
        ref = ScaleSetRef(sim.subscription_id, "rg", "web")
        adapter.set_capacity(ref, 8)
        sim.advance(61)  # created, not yet reporting healthy
        new = [i for i in adapter.read_inventory(ref, NOW).instances if i.id == "7"]
        assert [i.health for i in new] == [Health(warming)]
        sim.advance(60)
        new = [i for i in adapter.read_inventory(ref, NOW).instances if i.id == "7"]
        assert [i.health for i in new] == [Health.HEALTHY]
