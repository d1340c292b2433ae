"""Automatic instance repairs (`properties.automaticRepairsPolicy`), run on armsim's clock.

With the policy enabled, the platform repairs a VM that reports `HealthState/unhealthy` or
`HealthState/unknown` once the grace period (`gracePeriod`, default PT30M, PT10M..PT90M) has
passed since its last state change completed (created, reimaged, restarted). A protected VM
is never repaired, nor one that failed to provision. At most 5% of the scale set's VMs are
repaired at a time (one at a time below 20 VMs). `repairAction`:

- `Replace` (the default): the VM is deleted (after any terminate notification delay) and a
  new one, with a new name and instance id, is created from the latest model at once; the
  capacity stays as it is. armsim places the new VM in the repaired VM's zone.
- `Reimage`: the VM keeps its name; Updating for `REIMAGE_SECONDS`, then it reports health
  again as a new VM does.
- `Restart`: the VM keeps its name; starting for `RESTART_SECONDS`, then the same.

Repairs are the platform's: no Event Grid event and no request in the log; the VM journal
names no caller. The engine looks at each scale set with the policy every `SWEEP_SECONDS`.
Sources: docs/armsim.md ("Automatic repairs").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from armsim.errors import bad_request
from armsim.scenario import parse_iso_duration

if TYPE_CHECKING:
    from armsim.resources import ScaleSetState, Vm
    from armsim.simulator import ArmSim
    from armsim.world import World

ACTIONS = ("Replace", "Reimage", "Restart")
DEFAULT_GRACE_PERIOD = "PT30M"
GRACE_RANGE = (timedelta(minutes=10), timedelta(minutes=90))
SWEEP_SECONDS = 60.0
"""How often the engine looks for VMs to repair (ours: Azure names no interval)."""
REIMAGE_SECONDS = 120.0
RESTART_SECONDS = 60.0
"""Virtual seconds a reimage or a restart takes (ours: Azure names no duration)."""
BATCH_PERCENT = 5


def normalize_policy(body: Mapping[str, Any], current: Mapping[str, Any] | None) -> dict[str, Any]:
    """The policy a PUT or PATCH leaves on the scale set, with Azure's defaults filled in.

    Raises a 400 ArmError naming the property when a value is not one Azure accepts.
    """
    policy = {**(current or {}), **body}
    enabled = policy.get("enabled", False)
    if isinstance(enabled, str):
        enabled = enabled.lower() == "true"
    grace = str(policy.get("gracePeriod") or DEFAULT_GRACE_PERIOD)
    try:
        seconds = parse_iso_duration(grace)
    except ValueError as error:
        raise bad_request(str(error), "InvalidParameter") from error
    if not GRACE_RANGE[0] <= timedelta(seconds=seconds) <= GRACE_RANGE[1]:
        raise bad_request(
            f"The value {grace} of parameter 'automaticRepairsPolicy.gracePeriod' is out of "
            "range. The value must be between PT10M and PT90M.",
            "InvalidParameter",
        )
    action = str(policy.get("repairAction") or "Replace")
    known = {name.lower(): name for name in ACTIONS}
    if action.lower() not in known:
        raise bad_request(
            f"The value {action} of parameter 'automaticRepairsPolicy.repairAction' is not "
            f"valid. Allowed values are {', '.join(ACTIONS)}.",
            "InvalidParameter",
        )
    return {"enabled": bool(enabled), "gracePeriod": grace, "repairAction": known[action.lower()]}


@dataclass(frozen=True, slots=True)
class Repair:
    """One repair the platform made."""

    time: datetime
    scale_set_id: str
    instance_id: str
    action: str
    replacement: str | None = None
    """Replace: the new VM's instance id (Uniform) or name (Flexible)."""


class AutomaticRepairs:
    """The repair engine of one simulated subscription (owned by `ArmSim`)."""

    def __init__(self, sim: ArmSim) -> None:
        self._sim = sim
        self._sweeping: set[str] = set()
        self._settled: dict[int, datetime] = {}
        """VM serial -> when its last repair completed (the grace period starts again)."""
        self._in_flight: dict[str, set[int]] = {}
        self.repairs: list[Repair] = []

    def enable(
        self,
        resource_group: str,
        name: str,
        *,
        grace_period: str = DEFAULT_GRACE_PERIOD,
        repair_action: str = "Replace",
        enabled: bool = True,
    ) -> None:
        """Set the scale set's policy as a deployment would have it (no request, no event)."""
        world = self._sim.world
        with world.lock:
            world.settle(self._sim.clock.now())
            ss = world.find_scale_set(resource_group, name)
            ss.repairs_policy = normalize_policy(
                {"enabled": enabled, "gracePeriod": grace_period, "repairAction": repair_action},
                None,
            )
            self.policy_written(world, ss)

    def policy_written(self, world: World, ss: ScaleSetState) -> None:
        """Start looking at `ss` once its policy is enabled (called on every model write)."""
        if not (ss.repairs_policy or {}).get("enabled") or ss.key in self._sweeping:
            return
        self._sweeping.add(ss.key)
        world.after(world.now, SWEEP_SECONDS, lambda at: self._sweep(world, ss, at))

    # --- the engine -------------------------------------------------------------------

    def _sweep(self, world: World, ss: ScaleSetState, at: datetime) -> None:
        policy = ss.repairs_policy or {}
        if ss.deleted or not policy.get("enabled"):
            self._sweeping.discard(ss.key)
            return
        grace = timedelta(seconds=parse_iso_duration(str(policy["gracePeriod"])))
        busy = self._in_flight.setdefault(ss.key, set())
        busy &= {vm.serial for vm in ss.vms.values() if self._repairing(vm)}
        room = max(1, math.floor(len(ss.members()) * BATCH_PERCENT / 100)) - len(busy)
        for vm in sorted(ss.vms.values(), key=lambda vm: vm.serial):
            if room <= 0:
                break
            if self._due(world, vm, grace, at):
                busy.add(self._repair(world, vm, str(policy["repairAction"]), at).serial)
                room -= 1
        world.after(at, SWEEP_SECONDS, lambda t: self._sweep(world, ss, t))

    def _due(self, world: World, vm: Vm, grace: timedelta, at: datetime) -> bool:
        from armsim.render import reported_health

        if vm.gone or vm.provisioning_state != "Succeeded" or vm.power_state != "running":
            return False
        if vm.protect_from_scale_in or vm.protect_from_scale_set_actions:
            return False
        if reported_health(vm) not in ("unhealthy", "unknown"):
            return False
        created = vm.created + timedelta(seconds=world.timings.create)
        return at >= self._settled.get(vm.serial, created) + grace

    @staticmethod
    def _repairing(vm: Vm) -> bool:
        """Still under repair: the old VM is not gone, or the repaired or new one has not
        reported its health yet."""
        return not vm.gone and (
            vm.provisioning_state in ("Creating", "Updating", "Deleting")
            or vm.power_state == "starting"
            or vm.health in (None, "initializing")
        )

    def _repair(self, world: World, vm: Vm, action: str, at: datetime) -> Vm:
        """Repair `vm`; returns the VM the batch waits for (the new one for Replace)."""
        ss = vm.scale_set
        if action == "Replace":
            new = self._replace(world, vm, at)
            self.repairs.append(Repair(at, ss.resource_id, vm.instance_id, action, new.instance_id))
            return new
        seconds = REIMAGE_SECONDS if action == "Reimage" else RESTART_SECONDS
        if action == "Reimage":
            vm.provisioning_state = "Updating"
        vm.power_state, vm.health = "starting", None
        world.note(vm, "repairing", action.lower(), at=at)
        world.after(at, seconds, lambda t: self._restarted(world, vm, t))
        self.repairs.append(Repair(at, ss.resource_id, vm.instance_id, action))
        return vm

    def _restarted(self, world: World, vm: Vm, at: datetime) -> None:
        if vm.gone or vm.provisioning_state == "Deleting":
            return
        vm.provisioning_state, vm.power_state, vm.latest_model = "Succeeded", "running", True
        self._settled[vm.serial] = at
        if vm.scale_set.health_monitoring != "none":
            vm.health = "initializing"
            outcome = vm.scale_set.new_vm_health
            if outcome != "initializing":
                world.after(at, world.timings.health, lambda t: world._health(vm, outcome, t))
        world.note(vm, "repaired", at=at)

    def _replace(self, world: World, vm: Vm, at: datetime) -> Vm:
        """Delete `vm` and create its replacement at once; `sku.capacity` does not change."""
        from armsim.world import _allocation_failure

        ss = vm.scale_set
        vm.provisioning_state = "Deleting"
        world.note(vm, "deleting", "repair", at=at)
        world._notify(vm, at)
        seconds = (ss.terminate_notification_seconds or 0) + world.timings.delete
        world.after(at, seconds, lambda t: world._gone(vm, t))
        new = world._add_vm(ss, vm.zone, at)
        if world.has_room(ss, new.zone):
            world._allocate(new)
        else:
            new.failure = _allocation_failure(ss, new.zone)
        world.note(new, "created", "repair", at=at)
        world.after(at, world.timings.create, lambda t: world._provisioned(new, t))
        return new
