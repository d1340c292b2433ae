"""The simulated subscription: scale sets, VMs, zone capacity, quota, long-running operations.

Not thread-safe by itself: callers hold `World.lock` (the HTTP server and `ArmSim` do). Time
moves only through `settle(now)`, which fires due timers in order; each behaviour schedules
its next step on the timer heap, so no request scans all VMs of the subscription.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from armsim.errors import (
    ArmError,
    ErrorBody,
    OperationFailure,
    bad_request,
    entity_not_found,
    resource_group_not_found,
    resource_not_found,
)
from armsim.faults import HEALTH_KINDS, OPERATION_KINDS, PLACEMENT_KINDS, Faults
from armsim.placement import overprovision_extras, placement_order, scale_in_order
from armsim.resources import (
    DEFAULT_LIMIT,
    VM_TYPE,
    VMSS_TYPE,
    Caller,
    CapacityChange,
    Operation,
    ScaleSetState,
    Vm,
    VmChange,
)
from armsim.scenario import (
    ScaleSetSpec,
    Scenario,
    ScenarioError,
    SkuSpec,
    VmOverride,
    parse_iso_duration,
)


class World:
    """All state of one simulated subscription."""

    def __init__(
        self,
        scenario: Scenario,
        now: datetime,
        faults: Faults,
        emit: Callable[[Operation], None],
    ) -> None:
        self.lock = threading.RLock()
        self.scenario = scenario
        self.subscription_id = scenario.subscription_id
        self.timings = scenario.timings
        self.faults = faults
        self.emit = emit
        self.now = now
        self.random = random.Random(scenario.seed)
        """Resource names and ids: the same scenario and the same writes give the same VMs."""
        self._ids = random.Random(f"{scenario.seed}/ids")
        self._serials = itertools.count(1)
        self._timer_seq = itertools.count()
        self._timers: list[tuple[datetime, int, Callable[[datetime], None]]] = []
        self.resource_groups: dict[str, str] = {}
        self.scale_sets: dict[str, ScaleSetState] = {}
        self.vms_by_group: dict[str, dict[str, Vm]] = {}
        self.operations: dict[str, Operation] = {}
        self.journal: list[VmChange] = []
        self.model_hooks: list[Callable[[World, ScaleSetState], None]] = []
        """Called after each write of a scale set's model (armsim/repairs.py listens)."""
        self.capacity_journal: list[CapacityChange] = []
        self.skus: dict[str, SkuSpec] = {sku.name.lower(): sku for sku in scenario.skus}
        self.free: dict[tuple[str, str, str], int] = {}
        self.quota: dict[tuple[str, str], int] = {}
        self.usage: dict[tuple[str, str], int] = {}
        for group in scenario.resource_groups:
            self.resource_groups[group.lower()] = group
        for room in scenario.capacity:
            self.free[(room.location.lower(), room.sku.lower(), room.zone)] = room.available
        for quota in scenario.quotas:
            self.quota[(quota.location.lower(), quota.family.lower())] = quota.limit
        for spec in scenario.scale_sets:
            self.seed_scale_set(spec)
        for eviction in scenario.evictions:
            self.after(
                now,
                eviction.after_seconds,
                lambda at, e=eviction: self.evict_spot(
                    self.find_scale_set(e.resource_group, e.scale_set), e.count, e.zone, at
                ),
            )

    # --- time -------------------------------------------------------------------------

    def settle(self, now: datetime) -> None:
        """Fire every timer due at or before `now`, in time order."""
        while self._timers and self._timers[0][0] <= now:
            due, _, action = heapq.heappop(self._timers)
            self.now = max(self.now, due)
            action(due)
        self.now = max(self.now, now)

    def at(self, due: datetime, action: Callable[[datetime], None]) -> None:
        heapq.heappush(self._timers, (due, next(self._timer_seq), action))

    def after(self, start: datetime, seconds: float, action: Callable[[datetime], None]) -> None:
        self.at(start + timedelta(seconds=seconds), action)

    def new_id(self) -> str:
        """A request, correlation, event or operation id (drawn apart from resource names, so
        the number of reads a client makes does not change the VMs' names)."""
        return str(uuid.UUID(int=self._ids.getrandbits(128), version=4))

    def new_resource_id(self) -> str:
        return str(uuid.UUID(int=self.random.getrandbits(128), version=4))

    def note(
        self,
        vm: Vm,
        change: str,
        value: str | None = None,
        principal_id: str | None = None,
        at: datetime | None = None,
    ) -> None:
        """Add to the VM journal (runtime changes only, not the scenario's seeding)."""
        self.journal.append(
            VmChange(
                time=at or self.now,
                scale_set_id=vm.scale_set.resource_id,
                instance_id=vm.instance_id,
                zone=vm.zone,
                change=change,
                value=value,
                health=vm.health,
                protected=vm.protect_from_scale_in or vm.protect_from_scale_set_actions,
                principal_id=principal_id,
            )
        )

    def note_capacity(
        self,
        ss: ScaleSetState,
        change: str,
        principal_id: str | None,
        instance_id: str | None = None,
    ) -> None:
        """Add to the capacity journal (runtime changes only, not the scenario's seeding)."""
        self.capacity_journal.append(
            CapacityChange(
                time=self.now,
                scale_set_id=ss.resource_id,
                capacity=ss.capacity,
                change=change,
                instance_id=instance_id,
                principal_id=principal_id,
            )
        )

    # --- seeding ------------------------------------------------------------------------

    def sku(self, name: str) -> SkuSpec:
        return self.skus.get(name.lower()) or SkuSpec(name)

    def seed_scale_set(self, spec: ScaleSetSpec) -> None:
        ss = self._new_scale_set(
            resource_group=spec.resource_group,
            name=spec.name,
            location=spec.location,
            mode=spec.mode,
            sku=spec.sku,
            zones=spec.zones,
            capacity=spec.capacity if spec.capacity is not None else sum(spec.counts.values()),
            tags=dict(spec.tags),
            health_monitoring=spec.health_monitoring,
            platform_rebalancing=spec.platform_rebalancing,
            zone_balance=spec.zone_balance,
            terminate_notification_seconds=spec.terminate_notification_seconds,
            new_vm_health=spec.new_vm_health,
            health_states=spec.health_states,
            overprovision=spec.overprovision and spec.mode == "Uniform",
            created=self.now - timedelta(days=30),
            priority=spec.priority,
            eviction_policy=spec.eviction_policy,
            priority_mix=(
                (
                    spec.base_regular_priority_count or 0,
                    spec.regular_priority_percentage_above_base or 0,
                )
                if spec.priority_mix
                else None
            ),
            vm_sizes=tuple(spec.vm_sizes),
        )
        ss.provisioning_state = spec.provisioning_state
        created = self.now - timedelta(days=7)
        by_zone: dict[str | None, list[Vm]] = {}
        for zone, count in spec.counts.items():
            for _ in range(count):
                vm = self._add_vm(ss, zone or None, created)
                self._allocate(vm, force=True)
                vm.provisioning_state = "Succeeded"
                vm.power_state = "running"
                vm.health = "healthy" if ss.health_monitoring != "none" else None
                by_zone.setdefault(zone or None, []).append(vm)
        ordered = list(ss.vms.values())
        touched: set[int] = set()
        for override in spec.overrides:
            if override.instance is not None:
                targets = [vm for vm in ordered if vm.instance_id == override.instance]
                if not targets and override.instance.isdigit():
                    position = int(override.instance)
                    targets = ordered[position : position + 1]
                if not targets:
                    raise ScenarioError(
                        f"scale set {spec.name}: override instance {override.instance!r} "
                        "does not exist"
                    )
            else:
                free = [vm for vm in by_zone.get(override.zone, []) if vm.serial not in touched]
                if len(free) < override.count:
                    raise ScenarioError(
                        f"scale set {spec.name}: override wants {override.count} VMs in zone "
                        f"{override.zone!r}, only {len(free)} are left to override"
                    )
                targets = free[: override.count]
            for vm in targets:
                touched.add(vm.serial)
                self._apply_override(vm, override)
                if override.name is not None:
                    self._rename_flexible_vm(vm, override.name)
        for zone, count in spec.standby.items():
            for _ in range(count):
                vm = self._add_vm(ss, zone, created)
                self._allocate(vm, force=True)
                vm.provisioning_state, vm.power_state = "Succeeded", "running"
                vm.in_standby_pool = True
        for vm in ordered:
            if vm.provisioning_state == "Creating":
                self.after(
                    self.now, self.timings.create, lambda at, vm=vm: self._provisioned(vm, at)
                )
            elif vm.never_allocated:
                self._release(vm)

    def _rename_flexible_vm(self, vm: Vm, name: str) -> None:
        group = self.vms_by_group.setdefault(vm.scale_set.resource_group.lower(), {})
        if name.lower() in group:
            where = vm.scale_set.resource_group
            raise ScenarioError(f"a VM named {name!r} already exists in {where}")
        group.pop(vm.name.lower(), None)
        vm.scale_set.vms.pop(vm.instance_id.lower(), None)
        vm.name = vm.instance_id = name
        vm.scale_set.vms[name.lower()] = vm
        group[name.lower()] = vm

    @staticmethod
    def _apply_override(vm: Vm, override: VmOverride) -> None:
        if override.provisioning_state is not None:
            vm.provisioning_state = override.provisioning_state
            if override.provisioning_state == "Creating":
                vm.power_state, vm.health = "starting", None
            elif override.provisioning_state == "Failed":
                vm.power_state, vm.health = "running", None
                vm.failure = OperationFailure(
                    "VMExtensionProvisioningError", "VM has reported a failure."
                )
        if override.power_state is not None:
            vm.power_state = override.power_state
            if override.power_state != "running":
                vm.health = None
        if override.health is not None and vm.health is not None:
            vm.health = override.health
        if override.protect_from_scale_in is not None:
            vm.protect_from_scale_in = override.protect_from_scale_in
        if override.protect_from_scale_set_actions is not None:
            vm.protect_from_scale_set_actions = override.protect_from_scale_set_actions
        if override.latest_model is not None:
            vm.latest_model = override.latest_model
        if override.priority is not None:
            vm.spot = override.priority == "Spot"

    def _new_scale_set(self, **kwargs: Any) -> ScaleSetState:
        group = kwargs["resource_group"]
        self.resource_groups.setdefault(group.lower(), group)
        ss = ScaleSetState(
            subscription_id=self.subscription_id, unique_id=self.new_resource_id(), **kwargs
        )
        self.scale_sets[ss.key] = ss
        return ss

    def _add_vm(self, ss: ScaleSetState, zone: str | None, created: datetime) -> Vm:
        if ss.mode == "Flexible":
            group = self.vms_by_group.setdefault(ss.resource_group.lower(), {})
            while True:
                name = f"{ss.name}_{self.random.getrandbits(32):08x}"
                if name.lower() not in group:
                    break
            instance_id = name
        else:
            instance_id = str(ss.next_instance_id)
            ss.next_instance_id += 1
            name = f"{ss.name}_{instance_id}"
        vm = Vm(
            serial=next(self._serials),
            scale_set=ss,
            instance_id=instance_id,
            name=name,
            zone=zone,
            vm_id=self.new_resource_id(),
            created=created,
            spot=ss.next_spot(),
        )
        ss.vms[instance_id.lower()] = vm
        if ss.mode == "Flexible":
            self.vms_by_group.setdefault(ss.resource_group.lower(), {})[name.lower()] = vm
        return vm

    # --- capacity and quota -------------------------------------------------------------

    def _room_key(self, ss: ScaleSetState, zone: str | None) -> tuple[str, str, str]:
        return (ss.location.lower(), ss.sku.lower(), zone or "")

    def has_room(self, ss: ScaleSetState, zone: str | None) -> bool:
        free = self.free.get(self._room_key(ss, zone))
        return free is None or free > 0

    def _allocate(self, vm: Vm, force: bool = False) -> None:
        ss = vm.scale_set
        key = self._room_key(ss, vm.zone)
        if key in self.free and not force:
            # Seeded VMs (force) are already there: `available` counts room beyond them.
            self.free[key] -= 1
        sku = self.sku(ss.sku)
        for family in _families(sku, vm.spot):
            usage_key = (ss.location.lower(), family)
            self.usage[usage_key] = self.usage.get(usage_key, 0) + sku.vcpus
        vm.allocated = True

    def _release(self, vm: Vm) -> None:
        if not vm.allocated:
            return
        ss = vm.scale_set
        key = self._room_key(ss, vm.zone)
        if key in self.free:
            self.free[key] += 1
        sku = self.sku(ss.sku)
        for family in _families(sku, vm.spot):
            usage_key = (ss.location.lower(), family)
            self.usage[usage_key] = self.usage.get(usage_key, 0) - sku.vcpus
        vm.allocated = False

    def set_room(self, location: str, sku: str, zone: str, available: int | None) -> None:
        key = (location.lower(), sku.lower(), zone)
        if available is None:
            self.free.pop(key, None)
        else:
            self.free[key] = available

    def check_quota(self, ss: ScaleSetState, new_vms: int) -> None:
        """Spot VMs need room in `lowPriorityCores`, regular ones in the size's family and
        the regional total (a priority mix: as many of each as its split gives)."""
        sku = self.sku(ss.sku)
        if new_vms <= 0:
            return
        pooled = sum(1 for vm in ss.vms.values() if vm.in_standby_pool and not vm.gone)
        created = self._upcoming_spot(ss, new_vms)[pooled:]  # pool VMs hold their vCPUs
        new_vms, spot = len(created), sum(created)
        needs = []
        if new_vms - spot:
            needs += [
                (sku.family, sku.family, new_vms - spot),
                ("cores", "Total Regional", new_vms - spot),
            ]
        if spot:
            needs.append((LOW_PRIORITY_FAMILY, "Low Priority", spot))
        for family, label, vms in needs:
            required = vms * sku.vcpus
            key = (ss.location.lower(), family.lower())
            limit = self.quota.get(key, DEFAULT_LIMIT)
            usage = self.usage.get(key, 0)
            if usage + required > limit:
                raise ArmError(
                    409,
                    "OperationNotAllowed",
                    f"Operation could not be completed as it results in exceeding approved "
                    f"{label} Cores quota. Additional details - Deployment Model: Resource "
                    f"Manager, Location: {ss.location}, Current Limit: {limit}, Current Usage: "
                    f"{usage}, Additional Required: {required}, (Minimum) New Limit Required: "
                    f"{usage + required}. Submit a request for Quota increase at "
                    "https://aka.ms/ProdportalCRP/#blade/Microsoft_Azure_Capacity/"
                    "UsageAndQuota.ReactView by specifying parameters listed in the "
                    "'Details' section for deployment to succeed.",
                )

    @staticmethod
    def _upcoming_spot(ss: ScaleSetState, count: int) -> list[bool]:
        """Whether each of the next `count` new VMs is Spot (pool VMs taken first keep theirs)."""
        pooled = [vm for vm in ss.vms.values() if vm.in_standby_pool]
        upcoming = [vm.spot for vm in pooled[:count]]
        if len(upcoming) == count or ss.priority_mix is None:
            return upcoming + [ss.priority == "Spot"] * (count - len(upcoming))
        base, percent = ss.priority_mix
        members = [vm for vm in ss.members() if not vm.never_allocated]
        regular = sum(1 for vm in members if not vm.spot) + upcoming.count(False)
        total = len(members) + len(upcoming)
        while len(upcoming) < count:
            total += 1
            target = min(total, base) + -(-max(0, total - base) * percent // 100)
            is_spot = regular >= target
            regular += int(not is_spot)
            upcoming.append(is_spot)
        return upcoming

    def check_sku(self, ss: ScaleSetState) -> None:
        sku = self.sku(ss.sku)
        if ss.location.lower() in {loc.lower() for loc in sku.unavailable_locations}:
            raise ArmError(
                409,
                "SkuNotAvailable",
                f"The requested VM size for resource 'Following SKUs have failed for Capacity "
                f"Restrictions: {ss.sku}' is currently not available in location "
                f"'{ss.location}'. Please try another size or deploy to a different location "
                "or different zone. See https://aka.ms/azureskunotavailable for details.",
            )

    def sku_catalog(self, location: str | None) -> list[tuple[SkuSpec, str]]:
        """(size, location) pairs the `skus` list shows: every known size in every location."""
        locations = {ss.location.lower(): ss.location for ss in self.scale_sets.values()}
        locations |= {q_loc: q_loc for (q_loc, _family) in self.quota}
        locations |= {room[0]: room[0] for room in self.free}
        if location is not None:
            locations = {location.lower(): location}
        sizes = dict(self.skus)
        for ss in self.scale_sets.values():
            sizes.setdefault(ss.sku.lower(), self.sku(ss.sku))
        return [
            (size, name)
            for size in sorted(sizes.values(), key=lambda s: s.name.lower())
            for name in sorted(locations.values(), key=str.lower)
        ]

    def usages(self, location: str) -> list[tuple[str, str, int, int]]:
        """(name, localized name, current vCPUs or count, limit) rows of `usages`."""
        loc = location.lower()
        rows = [
            (
                "cores",
                "Total Regional vCPUs",
                self.usage.get((loc, "cores"), 0),
                self.quota.get((loc, "cores"), DEFAULT_LIMIT),
            )
        ]
        families = {sku.family for sku in self.skus.values()}
        families |= {self.sku(ss.sku).family for ss in self.scale_sets.values()}
        families |= {
            family
            for (q_loc, family) in self.quota
            if q_loc == loc and family not in ("cores", LOW_PRIORITY_FAMILY.lower())
        }
        for family in sorted(families, key=str.lower):
            key = (loc, family.lower())
            rows.append(
                (
                    family,
                    f"{family[:1].upper()}{family[1:]} vCPUs",
                    self.usage.get(key, 0),
                    self.quota.get(key, DEFAULT_LIMIT),
                )
            )
        rows.append(
            (
                LOW_PRIORITY_FAMILY,
                "Total Regional Low-priority vCPUs",
                self.usage.get((loc, LOW_PRIORITY_FAMILY.lower()), 0),
                self.quota.get((loc, LOW_PRIORITY_FAMILY.lower()), DEFAULT_LIMIT),
            )
        )
        count = sum(
            1 for ss in self.scale_sets.values() if ss.location.lower() == loc and not ss.deleted
        )
        rows.append(("virtualMachineScaleSets", "Virtual Machine Scale Sets", count, 2500))
        return rows

    # --- lookups ------------------------------------------------------------------------

    def require_group(self, group: str) -> None:
        if group.lower() not in self.resource_groups:
            raise resource_group_not_found(group)

    def find_scale_set(self, group: str, name: str) -> ScaleSetState:
        self.require_group(group)
        ss = self.scale_sets.get(f"{group}/{name}".lower())
        if ss is None or ss.deleted:
            raise resource_not_found(VMSS_TYPE, name, group)
        return ss

    def scale_sets_in(self, group: str | None) -> list[ScaleSetState]:
        if group is not None:
            self.require_group(group)
        lowered = group.lower() if group else None
        return [
            ss
            for ss in self.scale_sets.values()
            if not ss.deleted and (lowered is None or ss.resource_group.lower() == lowered)
        ]

    def find_scale_set_vm(self, group: str, name: str, instance_id: str) -> Vm:
        ss = self.find_scale_set(group, name)
        vm = ss.vms.get(instance_id.lower())
        if vm is None or vm.gone:
            raise entity_not_found()
        return vm

    def find_vm(self, group: str, name: str) -> Vm:
        self.require_group(group)
        vm = self.vms_by_group.get(group.lower(), {}).get(name.lower())
        if vm is None or vm.gone:
            raise resource_not_found(VM_TYPE, name, group)
        return vm

    def vms_in(self, group: str) -> list[Vm]:
        self.require_group(group)
        return [vm for vm in self.vms_by_group.get(group.lower(), {}).values() if not vm.gone]

    # --- operations ---------------------------------------------------------------------

    def begin(
        self,
        kind: str,
        operation_name: str,
        resource_id: str,
        location: str,
        caller: Caller,
        scale_set: ScaleSetState | None,
        *,
        result: str | None = None,
        min_seconds: float = 0.0,
    ) -> Operation:
        op = Operation(
            id=self.new_id(),
            kind=kind,
            operation_name=operation_name,
            resource_id=resource_id,
            location=location,
            caller=caller,
            start=self.now,
            scale_set=scale_set,
            not_before=self.now + timedelta(seconds=min_seconds),
            result=result,
        )
        self.operations[op.id] = op
        if scale_set is not None:
            scale_set.active_ops += 1
            if scale_set.provisioning_state == "Succeeded":
                scale_set.provisioning_state = "Updating"
        fired = self.faults.match(
            OPERATION_KINDS, _fault_operation(operation_name), resource_id, caller.principal_id
        )
        if fired is not None:
            rule = fired.rule
            delay = max(rule.delay, self.timings.update)
            if rule.kind == "preempt":
                failure = OperationFailure(
                    "OperationPreempted",
                    rule.message
                    or "Operation execution has been preempted by a more recent operation.",
                )
                self.after(self.now, delay, lambda at: self.finish(op, "Canceled", failure, at))
            else:
                failure = OperationFailure(
                    rule.code or "InternalExecutionError",
                    rule.message or "An internal execution error occurred. Please retry later.",
                )
                op.pending_failure = failure
        if op.not_before > self.now:
            self.at(op.not_before, lambda at: self.check(op, at))
        return op

    def wait_for(self, op: Operation, vm: Vm, condition: str) -> None:
        op.waiting[vm.serial] = condition
        vm.waiters.add(op)

    def check(self, op: Operation, at: datetime) -> None:
        """Complete `op` when nothing is left to wait for."""
        if op.done or op.waiting or at < op.not_before:
            return
        if op.pending_failure is not None:
            self.finish(op, "Failed", op.pending_failure, at)
        else:
            self.finish(op, "Succeeded", None, at)

    def finish(
        self, op: Operation, status: str, failure: OperationFailure | None, at: datetime
    ) -> None:
        if op.done:
            return
        op.status, op.failure, op.end = status, failure, at
        for serial in list(op.waiting):
            op.waiting.pop(serial, None)
        ss = op.scale_set
        if ss is not None:
            ss.active_ops -= 1
            if ss.model_op is op:
                ss.model_op = None
            if ss.active_ops == 0 and ss.provisioning_state == "Updating":
                ss.provisioning_state = "Succeeded"
            if ss.active_ops == 0 and ss.provisioning_state == "Creating":
                ss.provisioning_state = "Succeeded" if status == "Succeeded" else "Failed"
        for action in op.on_done:
            action(op)
        self.emit(op)

    def _notify(self, vm: Vm, at: datetime) -> None:
        for op in list(vm.waiters):
            condition = op.waiting.get(vm.serial)
            satisfied = condition == "gone" and vm.gone
            satisfied |= condition == "provisioned" and vm.provisioning_state != "Creating"
            if condition is None or satisfied:
                op.waiting.pop(vm.serial, None)
                vm.waiters.discard(op)
                if condition == "provisioned" and vm.provisioning_state == "Failed":
                    op.pending_failure = _with_failed_vm(op.pending_failure, vm)
                self.check(op, at)

    # --- VM life ------------------------------------------------------------------------

    def _provisioned(self, vm: Vm, at: datetime) -> None:
        if vm.gone or vm.provisioning_state != "Creating":
            return
        ss = vm.scale_set
        fault = self.faults.match(HEALTH_KINDS, "vm.provision", ss.resource_id, None, vm.zone)
        if vm.failure is None and fault is not None and fault.rule.kind == "provisioning_failure":
            vm.failure = OperationFailure(
                fault.rule.code or "VMExtensionProvisioningError",
                fault.rule.message or "VM has reported a failure when processing extension.",
            )
        if vm.failure is not None:
            # An allocation failure never started; a VM whose extension failed was created and
            # runs (it keeps its slot and counts toward zone balance), reporting no health.
            vm.provisioning_state, vm.health = "Failed", None
            vm.power_state = "stopped" if vm.never_allocated else "running"
            if vm.never_allocated:
                self._release(vm)
            self.note(vm, "failed", vm.failure.code, at=at)
        else:
            vm.provisioning_state, vm.power_state = "Succeeded", "running"
            if ss.health_monitoring != "none":
                vm.health = "initializing"
                outcome = ss.new_vm_health
                if fault is not None and fault.rule.kind == "never_healthy":
                    outcome = "initializing"
                elif fault is not None and fault.rule.kind == "unhealthy":
                    outcome = "unhealthy"
                if outcome != "initializing":
                    self.after(at, self.timings.health, lambda t: self._health(vm, outcome, t))
            self.note(vm, "provisioned", at=at)
        self._notify(vm, at)

    def _health(self, vm: Vm, outcome: str, at: datetime) -> None:
        if vm.gone or vm.provisioning_state != "Succeeded" or vm.power_state != "running":
            return
        if vm.health == "initializing":
            vm.health = outcome
            self.note(vm, "health", outcome, at=at)

    def set_health(self, vm: Vm, health: str) -> None:
        if vm.health != health:
            vm.health = health
            self.note(vm, "health", health)

    def start_delete(
        self, vm: Vm, op: Operation, at: datetime, *, overprovisioned: bool = False
    ) -> None:
        """Deleting for the terminate notification delay plus the delete time, then gone.

        `overprovisioned`: the platform removes an extra VM of its own scale-out; `op` does not
        wait for it, and the journal names no caller, as for the platform's other steps."""
        if not overprovisioned:
            self.wait_for(op, vm, "gone")
        if vm.provisioning_state == "Deleting":
            return
        vm.provisioning_state = "Deleting"
        if overprovisioned:
            self.note(vm, "deleting", "overprovisioned", at=at)
        else:
            self.note(vm, "deleting", principal_id=op.caller.principal_id, at=at)
        self._notify(vm, at)
        seconds = (vm.scale_set.terminate_notification_seconds or 0) + self.timings.delete
        self.after(at, seconds, lambda t: self._gone(vm, t))

    def _gone(self, vm: Vm, at: datetime) -> None:
        if vm.gone:
            return
        vm.gone = True
        ss = vm.scale_set
        self._release(vm)
        ss.vms.pop(vm.instance_id.lower(), None)
        if ss.mode == "Flexible":
            self.vms_by_group.get(ss.resource_group.lower(), {}).pop(vm.name.lower(), None)
        self.note(vm, "deleted", at=at)
        self._notify(vm, at)

    # --- scale set behaviours -----------------------------------------------------------

    def _begin_model_write(self, ss: ScaleSetState, caller: Caller) -> Operation:
        """Start a write of the scale set's model (PUT or PATCH); it owns `ss.model_op`."""
        ss.version += 1
        op = self.begin(
            "write",
            f"{VMSS_TYPE}/write",
            ss.resource_id,
            ss.location,
            caller,
            ss,
            result="vmss",
            min_seconds=self.timings.update,
        )
        ss.model_op = op
        return op

    def reconcile_capacity(self, ss: ScaleSetState, op: Operation) -> None:
        """Create or delete VMs so that the members match `sku.capacity`."""
        members = ss.members()
        delta = ss.capacity - ss.held()
        if delta > 0:
            self._scale_out(ss, delta, op)
        elif delta < 0:
            for vm in scale_in_order(members, ss.zone_counts(), -delta):
                self.start_delete(vm, op, self.now)

    def _scale_out(self, ss: ScaleSetState, count: int, op: Operation) -> None:
        counts = ss.zone_counts()
        zones: list[str | None] = list(ss.zones) if ss.zones else [None]
        extras = overprovision_extras(count) if ss.overprovision else 0
        group: list[Vm] = []
        wanted: dict[str | None, int] = {}
        for index in range(count + extras):
            ranked = placement_order(zones, counts, strict=ss.zone_balance)
            if index < count and self._take_from_pool(ss, ranked, op):
                continue
            chosen = None
            for zone in ranked:
                if not self.has_room(ss, zone):
                    continue
                fault = self.faults.match(
                    PLACEMENT_KINDS, "placement", ss.resource_id, op.caller.principal_id, zone
                )
                if fault is None:
                    chosen = zone
                    break
            vm = self._add_vm(ss, chosen if chosen is not None else ranked[0], self.now)
            if chosen is None:
                vm.failure = _allocation_failure(ss, vm.zone)
            else:
                self._allocate(vm)
                counts[chosen] = counts.get(chosen, 0) + 1
            if index < count:
                wanted[vm.zone] = wanted.get(vm.zone, 0) + 1
            if extras:
                group.append(vm)
            else:
                self.wait_for(op, vm, "provisioned")
            self.note(vm, "created", principal_id=op.caller.principal_id)
            self.after(self.now, self.timings.create, lambda at, vm=vm: self._provisioned(vm, at))
        if extras:
            ss.pending_extras += extras
            key = -group[0].serial
            op.waiting[key] = "overprovisioned"
            self.after(
                self.now,
                self.timings.create,
                lambda at: self._trim_overprovisioned(op, key, group, count, wanted, at),
            )

    def _take_from_pool(self, ss: ScaleSetState, ranked: list[str | None], op: Operation) -> bool:
        """A scale-out moves a standby pool VM into the set (in the best-ranked zone that has
        one, else any) instead of creating a VM; it is already running."""
        pooled = [vm for vm in ss.vms.values() if vm.in_standby_pool and not vm.gone]
        if not pooled:
            return False
        rank = {zone: position for position, zone in enumerate(ranked)}
        vm = min(pooled, key=lambda v: (rank.get(v.zone, len(rank)), v.serial))
        vm.in_standby_pool = False
        self.note(vm, "created", principal_id=op.caller.principal_id)
        self.note(vm, "provisioned")
        return True

    # --- Spot evictions -----------------------------------------------------------------

    def evict_spot(
        self, ss: ScaleSetState, count: int, zone: str | None, at: datetime
    ) -> list[str]:
        """Azure takes back `count` running Spot VMs (of `zone`, if given): per the set's
        `evictionPolicy` they are deallocated (keeping their place and quota) or deleted
        (`sku.capacity` drops by one each). No ARM request, so no event."""
        if ss.deleted:
            return []
        running = [
            vm
            for vm in ss.members()
            if vm.spot
            and vm.power_state == "running"
            and vm.provisioning_state == "Succeeded"
            and (zone is None or vm.zone == zone)
        ]
        evicted = sorted(running, key=lambda vm: vm.serial, reverse=True)[:count]
        for vm in evicted:
            if ss.eviction_policy == "Delete":
                vm.provisioning_state = "Deleting"
                self.note(vm, "deleting", "evicted", at=at)
                ss.capacity = max(0, ss.capacity - 1)
                ss.version += 1
                self.note_capacity(ss, "delete", None, vm.instance_id)
                self.after(at, self.timings.delete, lambda t, vm=vm: self._gone(vm, t))
            else:
                vm.power_state, vm.health = "deallocated", None
                self.note(vm, "power", "deallocated", at=at)
        return [vm.instance_id for vm in evicted]

    def _trim_overprovisioned(
        self,
        op: Operation,
        key: int,
        group: list[Vm],
        count: int,
        wanted: Mapping[str | None, int],
        at: datetime,
    ) -> None:
        """Keep `count` of an overprovisioned scale-out's VMs, succeeded ones first and in the
        zones a scale-out of exactly `count` would have used, and delete the others; the write
        finishes without waiting for them to be gone. It fails only if fewer than `count`
        succeeded."""
        group[0].scale_set.pending_extras -= len(group) - count
        alive = [vm for vm in group if not vm.gone and vm.provisioning_state != "Deleting"]
        succeeded = [vm for vm in alive if vm.provisioning_state == "Succeeded"]
        keep: list[Vm] = []
        need = dict(wanted)
        for vm in sorted(succeeded, key=Vm.sort_key, reverse=True):
            if need.get(vm.zone, 0) > 0:
                keep.append(vm)
                need[vm.zone] -= 1
        for vm in [*sorted(succeeded, key=Vm.sort_key, reverse=True), *alive]:
            if len(keep) < count and vm not in keep:
                keep.append(vm)
        if op.pending_failure is None:
            failed = [vm for vm in keep if vm.provisioning_state == "Failed"]
            op.pending_failure = failed[0].failure if failed else None
        op.waiting.pop(key, None)
        for vm in alive:
            if vm not in keep:
                self.start_delete(vm, op, at, overprovisioned=True)
        self.check(op, at)

    def update_scale_set(
        self,
        ss: ScaleSetState,
        body: Mapping[str, Any],
        caller: Caller,
        if_match: str | None = None,
    ) -> Operation:
        """PATCH: capacity, tags, zones and the policies the rebalancer reads.

        `if_match` (the request's `If-Match`): the write happens only while the scale set's
        ETag is that one (or `*`); otherwise `412 PreconditionFailed`, nothing changes.
        """
        self._writable(ss)
        check_if_match(ss, if_match)
        sku = body.get("sku") or {}
        new_capacity = sku.get("capacity")
        if new_capacity is not None:
            if not isinstance(new_capacity, int) or new_capacity < 0:
                raise bad_request(
                    f"The value '{new_capacity}' of parameter 'sku.capacity' is out of range. "
                    "The value must be between '0' and '1000', inclusive.",
                    code="InvalidParameter",
                    target="sku.capacity",
                )
            growth = new_capacity - ss.held()
            if growth > 0:
                self.check_sku(ss)
                self.check_quota(ss, growth)
        self._apply_model(ss, body)
        if ss.model_op is not None and not ss.model_op.done:
            self.finish(
                ss.model_op,
                "Canceled",
                OperationFailure(
                    "OperationPreempted",
                    "Operation execution has been preempted by a more recent operation.",
                ),
                self.now,
            )
        op = self._begin_model_write(ss, caller)
        if new_capacity is not None:
            ss.capacity = new_capacity
            self.note_capacity(ss, "write", caller.principal_id)
            self.reconcile_capacity(ss, op)
        self.check(op, self.now)
        return op

    def _writable(self, ss: ScaleSetState) -> None:
        if ss.hold is not None:
            raise ss.hold
        if ss.provisioning_state == "Deleting":
            raise ArmError(
                409,
                "OperationNotAllowed",
                f"Operation is not allowed since the Virtual Machine Scale Set {ss.name} is "
                "marked for deletion.",
            )

    def _apply_model(self, ss: ScaleSetState, body: Mapping[str, Any]) -> None:
        if "tags" in body and isinstance(body["tags"], Mapping):
            ss.tags = {str(k): str(v) for k, v in body["tags"].items()}
        if "zones" in body and isinstance(body["zones"], list):
            added = [str(z) for z in body["zones"] if str(z) not in ss.zones]
            if [z for z in ss.zones if z not in [str(x) for x in body["zones"]]]:
                raise bad_request(
                    "Removing zones from a Virtual Machine Scale Set is not supported.",
                    code="InvalidParameter",
                    target="zones",
                )
            ss.zones = (*ss.zones, *added)
        props = body.get("properties") or {}
        if props.get("virtualMachineProfile"):
            # A new model: with a Manual upgrade policy existing VMs keep the old one.
            for vm in ss.vms.values():
                vm.latest_model = False
        if "zoneBalance" in props:
            ss.zone_balance = bool(props["zoneBalance"])
        if "overprovision" in props and ss.mode == "Uniform":
            ss.overprovision = bool(props["overprovision"])
        if isinstance(props.get("upgradePolicy"), Mapping):
            ss.upgrade_policy = {**ss.upgrade_policy, **props["upgradePolicy"]}
        if isinstance(props.get("automaticRepairsPolicy"), Mapping):
            from armsim.repairs import normalize_policy

            ss.repairs_policy = normalize_policy(props["automaticRepairsPolicy"], ss.repairs_policy)
            for hook in self.model_hooks:
                hook(self, ss)
        policy = (props.get("resiliencyPolicy") or {}).get("automaticZoneRebalancingPolicy")
        if isinstance(policy, Mapping) and "enabled" in policy:
            ss.platform_rebalancing = bool(policy["enabled"])
        profile = props.get("virtualMachineProfile") or {}
        terminate = (profile.get("scheduledEventsProfile") or {}).get(
            "terminateNotificationProfile"
        )
        if isinstance(terminate, Mapping):
            if terminate.get("enable") is False:
                ss.terminate_notification_seconds = None
            elif terminate.get("notBeforeTimeout"):
                try:
                    seconds = parse_iso_duration(str(terminate["notBeforeTimeout"]))
                except ValueError as error:
                    raise bad_request(str(error), "InvalidParameter") from error
                ss.terminate_notification_seconds = seconds
        extensions = (profile.get("extensionProfile") or {}).get("extensions")
        if isinstance(extensions, list):
            kinds = {
                str(((ext or {}).get("properties") or {}).get("type", "")) for ext in extensions
            }
            if kinds & {"ApplicationHealthLinux", "ApplicationHealthWindows"}:
                ss.health_monitoring = "extension"
            elif ss.health_monitoring == "extension":
                ss.health_monitoring = "none"
        probe = (profile.get("networkProfile") or {}).get("healthProbe")
        if isinstance(probe, Mapping) and probe.get("id") and ss.health_monitoring == "none":
            ss.health_monitoring = "probe"

    def create_scale_set(
        self, group: str, name: str, body: Mapping[str, Any], caller: Caller
    ) -> tuple[Operation, bool]:
        """PUT: create a new scale set from its model, or update an existing one."""
        self.require_group(group)
        existing = self.scale_sets.get(f"{group}/{name}".lower())
        if existing is not None and not existing.deleted:
            return self.update_scale_set(existing, body, caller), False
        location = body.get("location")
        if not isinstance(location, str) or not location:
            raise bad_request(
                "Required parameter 'location' is missing (null).", "InvalidParameter", "location"
            )
        props = body.get("properties") or {}
        sku = body.get("sku") or {}
        if not sku.get("name"):
            raise bad_request(
                "Required parameter 'sku.name' is missing (null).", "InvalidParameter", "sku.name"
            )
        capacity = int(sku.get("capacity") or 0)
        ss = self._new_scale_set(
            resource_group=group,
            name=name,
            location=location,
            mode=str(props.get("orchestrationMode") or "Uniform"),
            sku=str(sku["name"]),
            zones=tuple(str(z) for z in body.get("zones") or ()),
            capacity=0,
            tags={},
            health_monitoring="none",
            platform_rebalancing=False,
            zone_balance=False,
            terminate_notification_seconds=None,
            new_vm_health="healthy",
            overprovision=str(props.get("orchestrationMode") or "Uniform") == "Uniform",
            created=self.now,
        )
        ss.provisioning_state = "Creating"
        try:
            self._apply_model(ss, body)
            self.check_sku(ss)
            self.check_quota(ss, capacity)
        except ArmError:
            del self.scale_sets[ss.key]
            raise
        op = self._begin_model_write(ss, caller)
        ss.capacity = capacity
        self.note_capacity(ss, "write", caller.principal_id)
        self.reconcile_capacity(ss, op)
        self.check(op, self.now)
        return op, True

    def delete_instances(
        self, ss: ScaleSetState, instance_ids: Iterable[str], caller: Caller
    ) -> Operation:
        self._writable(ss)
        ids = [str(i) for i in instance_ids]
        if not ids:
            raise bad_request(
                "The value of parameter instanceIds is invalid.", "InvalidParameter", "instanceIds"
            )
        vms = []
        for instance_id in ids:
            vm = ss.vms.get(instance_id.lower())
            if vm is None or vm.gone:
                raise bad_request(
                    f"The provided instanceId {instance_id} is not an active Virtual Machine "
                    "Scale Set VM instanceId.",
                    "InvalidParameter",
                    "instanceIds",
                )
            vms.append(vm)
        op = self.begin(
            "action", f"{VMSS_TYPE}/delete/action", ss.resource_id, ss.location, caller, ss
        )
        ss.version += 1
        for vm in vms:
            if vm.provisioning_state != "Deleting":
                ss.capacity = max(0, ss.capacity - 1)
                self.note_capacity(ss, "delete", caller.principal_id, vm.instance_id)
            self.start_delete(vm, op, self.now)
        self.check(op, self.now)
        return op

    def delete_scale_set(self, ss: ScaleSetState, caller: Caller) -> Operation:
        if ss.hold is not None:
            raise ss.hold
        op = self.begin(
            "delete",
            f"{VMSS_TYPE}/delete",
            ss.resource_id,
            ss.location,
            caller,
            ss,
            min_seconds=self.timings.delete,
        )
        ss.provisioning_state = "Deleting"
        if ss.model_op is not None and not ss.model_op.done:
            self.finish(
                ss.model_op,
                "Canceled",
                OperationFailure("OperationPreempted", "The operation was preempted by a delete."),
                self.now,
            )
        for vm in list(ss.vms.values()):
            self.start_delete(vm, op, self.now)

        def gone(finished: Operation) -> None:
            if finished.status == "Succeeded":
                ss.deleted = True
                self.scale_sets.pop(ss.key, None)

        op.on_done.append(gone)
        self.check(op, self.now)
        return op

    # --- single VMs ---------------------------------------------------------------------

    def delete_vm(self, vm: Vm, caller: Caller, flexible_api: bool) -> Operation:
        ss = vm.scale_set
        if ss.hold is not None:
            raise ss.hold
        name = f"{VM_TYPE}/delete" if flexible_api else f"{VMSS_TYPE}/virtualMachines/delete"
        op = self.begin("delete", name, vm.resource_id, ss.location, caller, None)
        if vm.provisioning_state != "Deleting":
            ss.version += 1
            ss.capacity = max(0, ss.capacity - 1)
            self.note_capacity(ss, "delete", caller.principal_id, vm.instance_id)
        self.start_delete(vm, op, self.now)
        self.check(op, self.now)
        return op

    def update_protection(self, vm: Vm, policy: Mapping[str, Any], caller: Caller) -> Operation:
        ss = vm.scale_set
        if vm.provisioning_state == "Deleting":
            raise ArmError(
                409,
                "OperationNotAllowed",
                f"Operation 'PUT' is not allowed on VM '{vm.name}' since the VM is marked for "
                "deletion. You can only retry the Delete operation (or wait for an ongoing one "
                "to complete).",
            )
        if "protectFromScaleIn" in policy:
            vm.protect_from_scale_in = bool(policy["protectFromScaleIn"])
        if "protectFromScaleSetActions" in policy:
            vm.protect_from_scale_set_actions = bool(policy["protectFromScaleSetActions"])
        self.note(vm, "protection", principal_id=caller.principal_id)
        return self.begin(
            "write",
            f"{VMSS_TYPE}/virtualMachines/write",
            vm.resource_id,
            ss.location,
            caller,
            None,
            min_seconds=self.timings.update,
        )

    def deallocate_vm(self, vm: Vm, caller: Caller, flexible_api: bool) -> Operation:
        ss = vm.scale_set
        if vm.provisioning_state in ("Deleting", "Creating"):
            raise ArmError(
                409,
                "OperationNotAllowed",
                f"Operation 'deallocate' is not allowed on VM '{vm.name}' since the VM is "
                f"{vm.provisioning_state.lower()}.",
            )
        name = (
            f"{VM_TYPE}/deallocate/action"
            if flexible_api
            else f"{VMSS_TYPE}/virtualMachines/deallocate/action"
        )
        op = self.begin(
            "action",
            name,
            vm.resource_id,
            ss.location,
            caller,
            None,
            min_seconds=self.timings.deallocate,
        )
        if vm.power_state != "deallocated":
            vm.power_state, vm.health = "deallocating", None
            self.note(vm, "power", "deallocating", caller.principal_id)

            def done(at: datetime) -> None:
                if not vm.gone and vm.power_state == "deallocating":
                    vm.power_state = "deallocated"
                    self.note(vm, "power", "deallocated", at=at)

            self.after(self.now, self.timings.deallocate, done)
        return op

    def start_vm(self, vm: Vm) -> None:
        """Outside actor: a deallocated VM is started again (health reports after a delay)."""
        if vm.gone or vm.power_state == "running":
            return
        vm.power_state = "running"
        if vm.scale_set.health_monitoring != "none" and vm.provisioning_state == "Succeeded":
            vm.health = "initializing"
            outcome = vm.scale_set.new_vm_health
            if outcome != "initializing":
                self.after(self.now, self.timings.health, lambda t: self._health(vm, outcome, t))
        self.note(vm, "power", "running")


LOW_PRIORITY_FAMILY = "lowPriorityCores"
"""The regional Spot vCPU quota's usage name (Total Regional Low-priority vCPUs)."""


def _families(sku: SkuSpec, spot: bool) -> tuple[str, ...]:
    """The usage rows a VM's vCPUs count in: Spot ones only in the low-priority quota."""
    return (LOW_PRIORITY_FAMILY.lower(),) if spot else (sku.family.lower(), "cores")


def check_if_match(ss: ScaleSetState, if_match: str | None) -> None:
    """ARM's optimistic concurrency on a scale set write (`If-Match`)."""
    if if_match is None or if_match.strip() in ("*", ss.etag):
        return
    raise ArmError(
        412,
        "PreconditionFailed",
        f"The condition specified using HTTP conditional header(s) is not met: If-Match "
        f"{if_match} does not match the current ETag {ss.etag} of scale set {ss.name}.",
    )


def _allocation_failure(ss: ScaleSetState, zone: str | None) -> OperationFailure:
    if zone:
        return OperationFailure(
            "ZonalAllocationFailed",
            f"Allocation failed. We do not have sufficient capacity for the requested VM size "
            f"{ss.sku} in this zone. Read more about improving likelihood of allocation success "
            "at http://aka.ms/allocation-guidance",
        )
    return OperationFailure(
        "AllocationFailed",
        f"Allocation failed. We do not have sufficient capacity for the requested VM size "
        f"{ss.sku} in this region. Read more about improving likelihood of allocation success "
        "at http://aka.ms/allocation-guidance",
    )


def _with_failed_vm(failure: OperationFailure | None, vm: Vm) -> OperationFailure | None:
    """The operation's error once `vm` failed: the first failure's code and message on top,
    and one detail per failed VM (its code, `target` its instance id), as Compute reports a
    scale set write whose VMs failed."""
    if vm.failure is None:
        return failure
    detail = ErrorBody(vm.failure.code, vm.failure.message, vm.instance_id)
    top = failure or vm.failure
    return OperationFailure(top.code, top.message, (*top.details, detail))


def _fault_operation(operation_name: str) -> str:
    return {
        f"{VMSS_TYPE}/write": "vmss.update",
        f"{VMSS_TYPE}/delete/action": "vmss.delete_instances",
        f"{VMSS_TYPE}/delete": "vmss.delete",
        f"{VMSS_TYPE}/virtualMachines/delete": "vmss_vm.delete",
        f"{VMSS_TYPE}/virtualMachines/write": "vmss_vm.update",
        f"{VM_TYPE}/delete": "vm.delete",
    }.get(operation_name, "*")
