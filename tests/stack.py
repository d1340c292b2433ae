"""The whole stack on loopback for integration tests: armsim + Azurite + a Reconciler.

Real clients throughout: azure-mgmt-compute talks HTTPS to armsim, azure-data-tables talks to
Azurite. Time is armsim's virtual clock, so a 90-minute health timeout runs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from armsim import ArmSim, Scenario
from armsim.testing import ARM_SCOPE
from rebalancer.compute import ArmConfig, ComputeAdapter
from rebalancer.compute.clock import VirtualTime
from rebalancer.reconciler import Reconciler
from rebalancer.settings import Settings, load_settings
from rebalancer.store import Store


@dataclass
class Stack:
    sim: ArmSim
    store: Store
    compute: ComputeAdapter
    settings: Settings

    def reconciler(self, **overrides: Any) -> Reconciler:
        """A fresh reconciler sharing nothing with others but Table Storage and armsim."""
        return Reconciler(
            settings=overrides.pop("settings", self.settings),
            store=overrides.pop("store", self.store),
            compute=overrides.pop("compute", self.compute),
            clock=self.sim.clock.now,
            **overrides,
        )

    def counts(self, resource_group: str, name: str) -> dict[str, int]:
        return self.sim.scale_set(resource_group, name).zone_counts()


def settings_for(sim: ArmSim, **env: str) -> Settings:
    values = {
        "REBALANCER_SUBSCRIPTION_ID": sim.subscription_id,
        "REBALANCER_MODE": "enforce",
        "REBALANCER_APP_PRINCIPAL_ID": sim.scenario.app_principal_id,
        "REBALANCER_ARM_ENDPOINT": sim.endpoint,
    }
    values.update({f"REBALANCER_{key.upper()}": value for key, value in env.items()})
    return load_settings(values)


def compute_for(sim: ArmSim, settings: Settings) -> ComputeAdapter:
    config = ArmConfig.from_settings(
        settings, ca_cert=sim.ca_cert_path, credential_scopes=(ARM_SCOPE,), max_wait=5.0
    )
    return ComputeAdapter(config, credential=sim.credential, clock=VirtualTime(sim.clock))


@contextmanager
def running_stack(scenario: Scenario, store: Store, **env: str) -> Iterator[Stack]:
    with ArmSim.start(scenario) as sim:
        settings = settings_for(sim, **env)
        compute = compute_for(sim, settings)
        try:
            yield Stack(sim, store, compute, settings)
        finally:
            compute.close()
