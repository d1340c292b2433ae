"""Rolling upgrades of a scale set (`rollingUpgrades/latest`), run on armsim's clock.

A scale set whose `upgradePolicy.mode` is Rolling (or with automatic OS image upgrades
enabled) is upgraded in batches: at most `maxBatchInstancePercent` of its VMs at a time
(Azure's default 20, at least one VM) are reimaged - provisioning state Updating, not running
and no health for `REIMAGE_SECONDS` - then the next batch starts after
`pauseTimeBetweenBatches` (default PT0S). While it runs, `rollingUpgrades/latest` reports
`runningStatus.code` RollingForward; at the end Completed. A scale set never upgraded answers
404. The reimages are the platform's: no Event Grid event, no request in the log.

Sources: docs/armsim.md ("Rolling upgrades").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from armsim.errors import ArmError
from armsim.render import iso

if TYPE_CHECKING:
    from armsim.resources import ScaleSetState, Vm
    from armsim.simulator import ArmSim
    from armsim.world import World

REIMAGE_SECONDS = 120.0
"""Virtual seconds one batch of reimages takes (ours: Azure names no duration)."""
DEFAULT_POLICY: Mapping[str, Any] = {
    "maxBatchInstancePercent": 20,
    "maxUnhealthyInstancePercent": 20,
    "maxUnhealthyUpgradedInstancePercent": 20,
    "pauseTimeBetweenBatches": "PT0S",
}
"""RollingUpgradePolicy's documented defaults (Compute REST API, RollingUpgradePolicy)."""


def can_roll(policy: Mapping[str, Any]) -> bool:
    """Rolling mode, or automatic OS image upgrades (which roll by the same policy)."""
    automatic = (policy.get("automaticOSUpgradePolicy") or {}).get("enableAutomaticOSUpgrade")
    return str(policy.get("mode", "Manual")).lower() == "rolling" or automatic is True


@dataclass
class RollingUpgrade:
    """One upgrade of one scale set: its policy, progress and status."""

    scale_set: ScaleSetState
    policy: dict[str, Any]
    started: datetime
    pending: list[Vm]
    status: str = "RollingForward"
    last_action: str = "Start"
    last_action_time: datetime | None = None
    in_progress: list[Vm] = field(default_factory=list)
    succeeded: int = 0

    def document(self) -> dict[str, Any]:
        ss = self.scale_set
        return {
            "properties": {
                "policy": dict(self.policy),
                "runningStatus": {
                    "code": self.status,
                    "startTime": iso(self.started),
                    "lastAction": self.last_action,
                    "lastActionTime": iso(self.last_action_time or self.started),
                },
                "progress": {
                    "successfulInstanceCount": self.succeeded,
                    "failedInstanceCount": 0,
                    "inProgressInstanceCount": len(self.in_progress),
                    "pendingInstanceCount": len(self.pending),
                },
            },
            "type": "Microsoft.Compute/virtualMachineScaleSets/rollingUpgrades",
            "location": ss.location,
        }


class RollingUpgrades:
    """Every scale set's latest rolling upgrade (owned by `ArmSim`)."""

    def __init__(self, sim: ArmSim) -> None:
        self._sim = sim
        self._latest: dict[str, RollingUpgrade] = {}

    def start(self, resource_group: str, name: str) -> RollingUpgrade:
        """The platform starts a rolling upgrade (a model change with mode Rolling, or an
        automatic OS image upgrade): every VM is reimaged, batch by batch."""
        world = self._sim.world
        with world.lock:
            world.settle(self._sim.clock.now())
            ss = world.find_scale_set(resource_group, name)
            return self.begin(world, ss)

    def begin(self, world: World, ss: ScaleSetState) -> RollingUpgrade:
        policy = {**DEFAULT_POLICY, **(ss.upgrade_policy.get("rollingUpgradePolicy") or {})}
        if not can_roll(ss.upgrade_policy):
            raise ArmError(
                409,
                "OperationNotAllowed",
                "Rolling upgrades require upgradePolicy.mode Rolling or automatic OS upgrades.",
            )
        current = self._latest.get(ss.key)
        if current is not None and current.status == "RollingForward":
            return current
        vms = sorted(
            (vm for vm in ss.vms.values() if not vm.gone and vm.provisioning_state == "Succeeded"),
            key=lambda vm: vm.serial,
        )
        upgrade = RollingUpgrade(ss, policy, world.now, vms)
        self._latest[ss.key] = upgrade
        self._next_batch(world, upgrade, world.now)
        return upgrade

    def latest(self, resource_group: str, name: str) -> dict[str, Any]:
        ss = self._sim.world.find_scale_set(resource_group, name)
        upgrade = self._latest.get(ss.key)
        if upgrade is None:
            raise ArmError(
                404,
                "NotFound",
                f"The entity was not found in this Azure location. Scale set {ss.name} has no "
                "rolling upgrade.",
            )
        return upgrade.document()

    def running(self, resource_group: str, name: str) -> bool:
        ss = self._sim.world.find_scale_set(resource_group, name)
        upgrade = self._latest.get(ss.key)
        return upgrade is not None and upgrade.status == "RollingForward"

    # --- the batches ------------------------------------------------------------------

    def _batch_size(self, upgrade: RollingUpgrade) -> int:
        members = len(upgrade.scale_set.members())
        percent = int(upgrade.policy["maxBatchInstancePercent"])
        return max(1, math.floor(members * percent / 100))

    def _next_batch(self, world: World, upgrade: RollingUpgrade, at: datetime) -> None:
        upgrade.pending = [vm for vm in upgrade.pending if not vm.gone]
        if not upgrade.pending:
            upgrade.status, upgrade.last_action_time = "Completed", at
            return
        batch = upgrade.pending[: self._batch_size(upgrade)]
        upgrade.pending = upgrade.pending[len(batch) :]
        upgrade.in_progress = batch
        for vm in batch:
            vm.provisioning_state = "Updating"
            vm.power_state = "starting"
            vm.health = None
            world.note(vm, "reimaging", at=at)
        world.after(at, REIMAGE_SECONDS, lambda t: self._batch_done(world, upgrade, t))

    def _batch_done(self, world: World, upgrade: RollingUpgrade, at: datetime) -> None:
        from armsim.scenario import parse_iso_duration

        for vm in upgrade.in_progress:
            if vm.gone or vm.provisioning_state != "Updating":
                continue
            vm.provisioning_state, vm.power_state, vm.latest_model = "Succeeded", "running", True
            if vm.scale_set.health_monitoring != "none":
                vm.health = vm.scale_set.new_vm_health
            world.note(vm, "reimaged", at=at)
            upgrade.succeeded += 1
        upgrade.in_progress = []
        pause = parse_iso_duration(str(upgrade.policy["pauseTimeBetweenBatches"]))
        world.after(at, pause, lambda t: self._next_batch(world, upgrade, t))
