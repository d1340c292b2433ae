"""The create-before-delete operation, walked through scenarios with a small fleet model.

`Fleet` below is a plain model of one scale set (not of the Azure SDK): it applies the
operation's commands the way the platform does (absolute capacity, best-effort zone placement,
VMs created then healthy, deletes delayed by the terminate notification) and lets a test act as
an outside party. It feeds the pure state machine the same `Inventory` values the Compute
adapter produces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from rebalancer.evaluator import assess, zone_counts
from rebalancer.model import (
    AutomaticRepairs,
    Health,
    HealthMonitoring,
    Instance,
    Inventory,
    OrchestrationMode,
    OutsideActivity,
    PowerState,
    ScaleSet,
    ScaleSetRef,
)
from rebalancer.operation import (
    BackOffZone,
    ClearZoneBackoff,
    DeleteInstances,
    Notify,
    OperationPolicy,
    OperationRecord,
    Reason,
    SetCapacity,
    State,
    Step,
    advance,
    describe,
    scale_out_rejected,
    start,
)

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
REF = ScaleSetRef("00000000-0000-0000-0000-000000000001", "rg-web", "vmss-web")
POLICY = OperationPolicy()


def vm(
    vm_id: str,
    zone: str,
    *,
    health: Health = Health.HEALTHY,
    power: PowerState = PowerState.RUNNING,
    state: str = "Succeeded",
    protected: bool = False,
    failure: str | None = None,
) -> Instance:
    return Instance(
        id=vm_id,
        name=f"vmss-web_{vm_id}",
        zone=zone,
        provisioning_state=state,
        power_state=power,
        health=health,
        protect_from_scale_in=protected,
        failure=failure,
    )


@dataclass
class Fleet:
    """One scale set as the platform would run it, advanced by `tick()` in virtual steps."""

    zones: tuple[str, ...] = ("1", "2", "3")
    instances: dict[str, Instance] = field(default_factory=dict)
    capacity: int = 0
    provisioning_state: str = "Succeeded"
    platform_rebalancing: bool = False
    terminate_notification: timedelta | None = None
    zone_room: dict[str, int] = field(default_factory=dict)
    """Zones listed here can take only that many more VMs (capacity shortage)."""
    never_healthy: set[str] = field(default_factory=set)
    extension_fails: set[str] = field(default_factory=set)
    """New VMs whose extensions fail: created, then `Failed` with VMExtensionProvisioningError."""
    delete_ticks: int = 1
    """Ticks a deleting VM stays before it is gone (a terminate notification makes it longer)."""
    next_id: int = 100
    deleting_for: dict[str, int] = field(default_factory=dict)
    mode: OrchestrationMode = OrchestrationMode.UNIFORM
    tags: dict[str, str] = field(default_factory=dict)
    capacity_drops_when_gone: bool = False
    """Lower `sku.capacity` when a deleted VM is gone, not when its delete is requested."""
    capacity_pending: set[str] = field(default_factory=set)
    repairs: AutomaticRepairs | None = None
    eviction_policy: str | None = None
    """A Spot set's `evictionPolicy`; None: regular VMs."""

    @classmethod
    def of(cls, layout: dict[str, int], **kw: object) -> Fleet:
        """`{"1": 1, "2": 3}` -> healthy VMs with numeric ids, zone by zone."""
        fleet = cls(**kw)  # type: ignore[arg-type]
        number = 0
        for zone, count in layout.items():
            for _ in range(count):
                fleet.instances[str(number)] = vm(str(number), zone)
                number += 1
        fleet.capacity = len(fleet.instances)
        return fleet

    def add(self, *instances: Instance) -> Fleet:
        for instance in instances:
            self.instances[instance.id] = instance
        self.capacity = sum(1 for i in self.instances.values() if not i.deleting)
        return self

    def scale_set(self) -> ScaleSet:
        return ScaleSet(
            ref=REF,
            location="westeurope",
            zones=self.zones,
            sku_name="Standard_D2s_v5",
            capacity=self.capacity,
            mode=self.mode,
            provisioning_state=self.provisioning_state,
            health_monitoring=HealthMonitoring.EXTENSION,
            platform_rebalancing=self.platform_rebalancing,
            tags=self.tags,
            terminate_notification=self.terminate_notification,
            automatic_repairs=self.repairs,
            spot=self.eviction_policy is not None,
            eviction_policy=self.eviction_policy,
        )

    def inventory(self, now: datetime) -> Inventory:
        ordered = sorted(self.instances.values(), key=Instance.sort_id)
        return Inventory(self.scale_set(), tuple(ordered), now)

    # the platform ---------------------------------------------------------------------------

    def apply(self, commands: tuple[object, ...]) -> None:
        for command in commands:
            if isinstance(command, SetCapacity):
                self.set_capacity(command.capacity)
            elif isinstance(command, DeleteInstances):
                self.delete(command.ids)

    def set_capacity(self, capacity: int) -> None:
        while self.capacity < capacity:
            self.capacity += 1
            self.provisioning_state = "Updating"
            vm_id = str(self.next_id)
            self.next_id += 1
            zone = self._place()
            state = "Creating" if zone is not None else "Failed"
            failure = None if zone is not None else "ZonalAllocationFailed"
            zone = zone or self._fewest(self.zones)
            self.instances[vm_id] = vm(
                vm_id, zone, health=Health.NOT_REPORTED, state=state, failure=failure
            )
        if self.capacity > capacity:  # a scale-in by someone else: highest ids go
            candidates = [i for i in self.instances.values() if not i.deleting and not i.protected]
            candidates.sort(key=Instance.sort_id, reverse=True)
            victims = tuple(i.id for i in candidates[: self.capacity - capacity])
            self.capacity = capacity
            self.delete(victims, lowers_capacity=False)

    def _fewest(self, zones: tuple[str, ...]) -> str:
        counts = zone_counts(self.scale_set(), self.instances.values())
        return min(zones, key=lambda z: (counts[z].total, z))

    def _place(self) -> str | None:
        """Best effort: the emptiest zone that still has room."""
        open_zones = tuple(z for z in self.zones if self.zone_room.get(z, 1) > 0)
        if not open_zones:
            return None
        zone = self._fewest(open_zones)
        if zone in self.zone_room:
            self.zone_room[zone] -= 1
        return zone

    def delete(self, ids: tuple[str, ...], *, lowers_capacity: bool = True) -> None:
        for vm_id in ids:
            instance = self.instances.get(vm_id)
            if instance is None or instance.deleting:
                continue
            self.instances[vm_id] = replace(instance, provisioning_state="Deleting")
            self.deleting_for[vm_id] = self.delete_ticks
            if lowers_capacity and self.capacity_drops_when_gone:
                self.capacity_pending.add(vm_id)
            elif lowers_capacity:
                self.capacity -= 1

    def tick(self) -> None:
        for vm_id, instance in list(self.instances.items()):
            if instance.deleting:
                self.deleting_for[vm_id] -= 1
                if self.deleting_for[vm_id] <= 0:
                    del self.instances[vm_id]
                    del self.deleting_for[vm_id]
                    if vm_id in self.capacity_pending:
                        self.capacity_pending.discard(vm_id)
                        self.capacity -= 1
            elif instance.provisioning_state == "Creating" and vm_id in self.extension_fails:
                self.instances[vm_id] = replace(
                    instance, provisioning_state="Failed", failure="VMExtensionProvisioningError"
                )
            elif instance.provisioning_state == "Creating":
                self.instances[vm_id] = replace(
                    instance, provisioning_state="Succeeded", health=Health.INITIALIZING
                )
            elif instance.health is Health.INITIALIZING:
                health = Health.UNHEALTHY if vm_id in self.never_healthy else Health.HEALTHY
                self.instances[vm_id] = replace(instance, health=health)
        if not any(i.provisioning_state == "Creating" for i in self.instances.values()):
            self.provisioning_state = "Succeeded"

    # checks ---------------------------------------------------------------------------------

    def totals(self) -> tuple[int, ...]:
        return tuple(
            c.total for c in zone_counts(self.scale_set(), self.instances.values()).values()
        )

    def healthy(self) -> int:
        return sum(1 for i in self.instances.values() if i.healthy)


@dataclass
class Run:
    """Drive one operation over a fleet, collecting every command and step."""

    fleet: Fleet
    policy: OperationPolicy = POLICY
    now: datetime = T0
    step_minutes: int = 5
    activity: OutsideActivity = field(default_factory=OutsideActivity)
    """What events reported someone else doing to the scale set's size."""
    commands: list[object] = field(default_factory=list)
    records: list[OperationRecord] = field(default_factory=list)

    def start(self) -> OperationRecord:
        inventory = self.fleet.inventory(self.now)
        assessment = assess(inventory)
        assert assessment.moves, assessment.detail
        record, commands = start(inventory, assessment, self.policy, self.now, "op-1")
        self._apply(record, commands)
        return record

    def _apply(self, record: OperationRecord, commands: tuple[object, ...]) -> None:
        # Intent first: the record is "written" (round-tripped through JSON) before commands.
        assert OperationRecord.from_json(record.to_json()) == record
        self.records.append(record)
        self.commands.extend(commands)
        self.fleet.apply(commands)

    def step(self, record: OperationRecord, **kw: object) -> Step:
        kw.setdefault("activity", self.activity)
        step = advance(record, self.fleet.inventory(self.now), self.policy, self.now, **kw)
        self._apply(step.record, step.commands)
        return step

    def until_done(self, record: OperationRecord, limit: int = 200) -> OperationRecord:
        for _ in range(limit):
            if record.state.terminal:
                return record
            self.fleet.tick()
            self.now += timedelta(minutes=self.step_minutes)
            step = self.step(record)
            while step.observe_again and not step.record.state.terminal:
                step = self.step(step.record)
            record = step.record
        raise AssertionError(f"operation did not end: {describe(record, self.now)}")

    def of(self, kind: type) -> list:
        return [c for c in self.commands if isinstance(c, kind)]

    def deleted(self) -> set[str]:
        return {vm_id for c in self.of(DeleteInstances) for vm_id in c.ids}


# --- the documented scenarios ---------------------------------------------------------------


def test_1_3_3_becomes_balanced_with_one_move():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    assert record.state is State.SCALING_OUT
    assert record.k == 1 and record.target_capacity == 8 and record.zone_needs == {"1": 1}
    assert run.of(SetCapacity) == [SetCapacity(8)]
    record = run.until_done(record)
    assert record.state is State.SUCCEEDED and record.outcome is Reason.MOVES_DONE
    assert fleet.totals() == (2, 2, 3) or fleet.totals() == (2, 3, 2)
    assert fleet.capacity == 7
    assert record.kept == ("100",) and len(record.sources) == 1
    assert record.sources[0] in {"1", "2", "3", "4", "5", "6"}
    assert run.of(ClearZoneBackoff) == [ClearZoneBackoff("westeurope", "Standard_D2s_v5", "1")]
    states = [t.state for t in record.history]
    assert states == [
        State.SCALING_OUT,
        State.AWAITING_HEALTH,
        State.SCALING_IN,
        State.SCALING_IN,
        State.SUCCEEDED,
    ]
    assert [n.kind for n in run.of(Notify)][-1] == "operation.succeeded"


def test_the_capacity_write_carries_the_etag_of_the_read_it_was_decided_on():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    inventory = fleet.inventory(T0)
    inventory = replace(inventory, scale_set=replace(inventory.scale_set, etag='"7"'))
    _, commands = start(inventory, assess(inventory), POLICY, T0, "op-1")
    assert SetCapacity(8, etag='"7"') in commands


def test_0_2_4_with_max_surge_2_moves_two_at_once():
    fleet = Fleet.of({"2": 2, "3": 4})
    run = Run(fleet, policy=OperationPolicy(max_surge=2))
    record = run.start()
    assert record.k == 2 and run.of(SetCapacity) == [SetCapacity(8)]
    record = run.until_done(record)
    assert record.state is State.SUCCEEDED
    assert fleet.totals() == (2, 2, 2)
    assert set(record.sources) <= {"2", "3", "4", "5"} and len(record.sources) == 2
    assert fleet.capacity == 6


def test_2_4_7_with_deallocated_vms_never_deletes_a_deallocated_one():
    fleet = Fleet.of({"1": 2, "2": 4, "3": 5})
    fleet.add(
        vm("50", "3", power=PowerState.DEALLOCATED, health=Health.NOT_REPORTED),
        vm("51", "3", power=PowerState.DEALLOCATED, health=Health.NOT_REPORTED),
    )
    run = Run(fleet, policy=OperationPolicy(max_surge=2))
    record = run.until_done(run.start())
    assert record.state is State.SUCCEEDED
    assert fleet.totals() == (4, 4, 5)
    assert not run.deleted() & {"50", "51"}


def test_zone_without_capacity_rolls_back_and_backs_off():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, zone_room={"1": 0})
    run = Run(fleet)
    record = run.until_done(run.start())
    assert record.state is State.ROLLED_BACK
    assert record.history[1].reason is Reason.NO_CAPACITY_IN_TARGET_ZONE
    assert run.of(BackOffZone) == [
        BackOffZone("westeurope", "Standard_D2s_v5", "1", "no_capacity_in_target_zone")
    ]
    assert run.deleted() == {"100"}  # only the VM it created (it landed in zone 2 or 3)
    assert fleet.totals() == (1, 3, 3) and fleet.capacity == 7
    assert record.created == {"100": "2"}


def test_allocation_failure_everywhere_rolls_back_the_failed_vm():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, zone_room={"1": 0, "2": 0, "3": 0})
    run = Run(fleet)
    record = run.until_done(run.start())
    assert record.state is State.ROLLED_BACK
    assert run.deleted() == {"100"} and "100" not in fleet.instances


def test_allocation_failure_in_the_target_zone_backs_off_that_zone_only():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, zone_room={"1": 0, "2": 0, "3": 0})
    run = Run(fleet)
    record = run.until_done(run.start())
    assert record.state is State.ROLLED_BACK
    assert record.history[1].reason is Reason.NO_CAPACITY_IN_TARGET_ZONE
    assert "ZonalAllocationFailed" in record.history[1].detail
    assert run.of(BackOffZone) == [
        BackOffZone("westeurope", "Standard_D2s_v5", "1", "no_capacity_in_target_zone")
    ]


def test_new_vm_whose_extensions_failed_is_removed_without_backing_off_the_zone():
    """The zone had room (the VM was created there): a failed replacement, not a capacity
    shortage. The VM counts toward balance until it is gone, so it is removed."""
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, extension_fails={"100"})
    run = Run(fleet)
    record = run.until_done(run.start())
    assert record.state is State.ROLLED_BACK
    assert record.history[1].reason is Reason.NEW_VM_FAILED
    assert "VMExtensionProvisioningError" in record.history[1].detail
    assert run.of(BackOffZone) == []
    assert run.deleted() == {"100"} and "100" not in fleet.instances
    assert fleet.totals() == (1, 3, 3) and fleet.capacity == 7


def test_new_vm_never_healthy_and_healthy_source_deletes_the_new_vm():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, never_healthy={"100"})
    run = Run(fleet, step_minutes=20)
    record = run.until_done(run.start())
    assert record.state is State.ROLLED_BACK
    assert any(t.reason is Reason.HEALTH_TIMEOUT for t in record.history)
    assert run.deleted() == {"100"}
    assert fleet.totals() == (1, 3, 3) and fleet.healthy() == 7


def test_new_vm_never_healthy_and_unhealthy_source_deletes_the_source():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, never_healthy={"100"})
    fleet.add(replace(fleet.instances["5"], health=Health.UNHEALTHY))
    run = Run(fleet, step_minutes=20)
    record = run.until_done(run.start())
    assert record.state is State.SUCCEEDED
    assert record.sources == ("5",) and record.kept == ("100",)
    assert "100" in fleet.instances and "5" not in fleet.instances
    assert fleet.healthy() == 6  # as before: the unhealthy source was not counted


def test_new_vm_never_healthy_and_a_source_whose_health_is_not_known_keeps_the_source():
    """Health is three-valued: a source is deleted beside an unhealthy replacement only when
    it was observed unhealthy, never because its health was not reported."""
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, never_healthy={"100"})
    fleet.add(replace(fleet.instances["6"], health=Health.NOT_REPORTED))
    run = Run(fleet, step_minutes=20)
    record = run.until_done(run.start())
    assert record.state is State.ROLLED_BACK
    assert any(t.reason is Reason.HEALTH_TIMEOUT for t in record.history)
    assert run.deleted() == {"100"} and "6" in fleet.instances


def test_health_deadline_is_the_policy_timeout():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, never_healthy={"100"})
    run = Run(fleet, policy=OperationPolicy(health_timeout=timedelta(minutes=30)))
    record = run.start()
    while record.state is not State.AWAITING_HEALTH:
        fleet.tick()
        run.now += timedelta(minutes=1)
        record = run.step(record).record
    placed_at = run.now
    assert record.health_deadline == placed_at + timedelta(minutes=30)
    run.now = placed_at + timedelta(minutes=29)
    assert run.step(record).record.state is State.AWAITING_HEALTH
    run.now = placed_at + timedelta(minutes=30)
    assert run.step(record).record.state is State.SCALING_IN


def test_protected_vms_in_the_fullest_zone_are_never_deleted():
    fleet = Fleet.of({"1": 1, "2": 3})
    fleet.zones = ("1", "2", "3")
    fleet.add(*(vm(str(n), "3", protected=n != 13) for n in range(10, 14)))
    run = Run(fleet)
    record = run.start()
    assert record.moves[0].source == "13"
    record = run.until_done(record)
    assert record.state is State.SUCCEEDED and record.sources == ("13",)
    assert not run.deleted() & {"10", "11", "12"}
    assert fleet.totals() == (2, 3, 3)


def test_source_protected_before_the_delete_is_re_chosen():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    while record.state is not State.SCALING_IN:
        fleet.tick()
        run.now += timedelta(minutes=5)
        record = run.step(record).record
    everyone = [i for i in fleet.instances.values() if i.zone in ("2", "3")]
    for instance in everyone[:-1]:
        fleet.add(replace(instance, protect_from_scale_set_actions=True))
    survivor = everyone[-1].id
    step = run.step(record)
    # conditional on the capacity seen: 7 VMs and the new one
    assert step.commands[0] == DeleteInstances((survivor,), capacity=8)
    record = run.until_done(step.record)
    assert record.state is State.SUCCEEDED and record.sources == (survivor,)


def test_no_eligible_source_left_removes_the_new_vm_instead():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    while record.state is not State.SCALING_IN:
        fleet.tick()
        run.now += timedelta(minutes=5)
        record = run.step(record).record
    for instance in list(fleet.instances.values()):
        if instance.zone in ("2", "3"):
            fleet.add(replace(instance, protect_from_scale_in=True))
    record = run.until_done(record)
    assert record.state is State.ROLLED_BACK
    assert any(t.reason is Reason.NOTHING_TO_KEEP for t in record.history)
    assert run.deleted() == {"100"}


def test_autoscale_scale_out_mid_operation_supersedes_and_deletes_nothing():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    fleet.tick()
    run.now += timedelta(minutes=5)
    record = run.step(record).record
    assert record.state is State.AWAITING_HEALTH
    fleet.set_capacity(10)  # autoscale
    record = run.until_done(record)
    assert record.state is State.SUPERSEDED and record.outcome is Reason.CAPACITY_CHANGED
    assert run.deleted() == set()
    assert "100" in record.created


def test_autoscale_before_our_scale_out_is_visible_supersedes():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    inventory = fleet.inventory(T0)
    record, _ = start(inventory, assess(inventory), POLICY, T0, "op-1")  # command lost
    fleet.set_capacity(12)
    step = run.step(record)
    assert step.record.state is State.SUPERSEDED and not step.commands[:-1]


def test_someone_deletes_the_new_vm_mid_operation():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    fleet.tick()
    run.now += timedelta(minutes=5)
    record = run.step(record).record
    fleet.delete(("100",))
    run.activity = OutsideActivity(vms_deleted_at=run.now)
    record = run.until_done(record)
    assert record.state is State.SUPERSEDED
    assert record.outcome is Reason.NEW_VM_REMOVED
    assert run.deleted() == set()
    assert fleet.totals() == (1, 3, 3)


def test_a_scale_in_then_out_by_someone_else_mid_move_keeps_their_new_vm():
    """The owners scale in (Azure picks the operation's new VM) and out again: the capacity is
    the operation's target once more, with a VM the operation never asked for. Their last
    capacity counts that VM in; deleting it would leave the scale set one below it."""
    run = Run(Fleet.of({"1": 1, "2": 3, "3": 3}))
    record = run.start()
    run.fleet.tick()
    run.now += timedelta(minutes=5)
    record = run.step(record).record
    assert record.state is State.AWAITING_HEALTH and record.kept == ("100",)
    run.fleet.set_capacity(7)  # VM 100 goes (the highest id)
    run.now += timedelta(minutes=1)
    record = run.step(record).record
    run.fleet.set_capacity(8)  # VM 101 comes
    run.activity = OutsideActivity(capacity_written_at=run.now)
    record = run.until_done(record)
    assert (record.state, record.outcome) == (State.SUPERSEDED, Reason.CAPACITY_CHANGED)
    assert run.deleted() == set()
    assert run.fleet.capacity == 8 and "101" in run.fleet.instances


def _mid_move_drop(run: Run) -> OperationRecord:
    """Uniform 1/3/3 with the new VM placed; then VM 0 is gone and capacity is one lower:
    someone deleted it, or wrote capacity 7 and Azure removed it (the same observation)."""
    record = run.start()
    run.fleet.tick()
    run.now += timedelta(minutes=5)
    record = run.step(record).record
    assert record.state is State.AWAITING_HEALTH and record.kept == ("100",)
    run.fleet.delete(("0",))
    run.fleet.tick()
    return record


def test_a_lower_capacity_written_mid_move_counts_the_new_vm_in():
    run = Run(Fleet.of({"1": 1, "2": 3, "3": 3}))
    record = _mid_move_drop(run)
    run.activity = OutsideActivity(capacity_written_at=run.now)
    record = run.until_done(record)
    assert (record.state, record.outcome) == (State.SUPERSEDED, Reason.CAPACITY_CHANGED)
    assert "written by someone else" in record.outcome_detail
    assert run.deleted() == set()
    assert run.fleet.capacity == 7


def test_vms_deleted_mid_move_take_the_new_vm_with_them():
    run = Run(Fleet.of({"1": 1, "2": 3, "3": 3}))
    record = _mid_move_drop(run)
    run.activity = OutsideActivity(vms_deleted_at=run.now)
    record = run.until_done(record)
    assert (record.state, record.outcome) == (State.SUPERSEDED, Reason.OUTSIDE_DELETE)
    assert run.deleted() == {"100"}


def test_vms_missing_with_no_event_wait_for_it_then_the_new_vm_is_kept():
    run = Run(Fleet.of({"1": 1, "2": 3, "3": 3}))
    record = _mid_move_drop(run)
    missing_at = run.now
    step = run.step(record)
    assert step.record.state is State.AWAITING_HEALTH and not step.commands
    assert step.record.cause_wait_since == missing_at
    assert "waits for the event" in describe(step.record, run.now)
    # A late event still decides: VMs deleted, so the new VM goes.
    run.now = missing_at + POLICY.outside_cause_wait - timedelta(minutes=1)
    late = run.step(step.record, activity=OutsideActivity(vms_deleted_at=missing_at))
    assert late.record.state is State.ROLLING_BACK
    # No event at all: after the wait, the new VM is kept (never below what owners set).
    run.now = missing_at + POLICY.outside_cause_wait
    kept = run.step(step.record)
    assert (kept.record.state, kept.record.outcome) == (State.SUPERSEDED, Reason.CAPACITY_CHANGED)
    assert not [c for c in kept.commands if isinstance(c, DeleteInstances)]
    assert "no event in 30 min" in kept.record.outcome_detail


@pytest.mark.parametrize(("eviction", "evicted"), [("Delete", True), ("Deallocate", False)])
def test_spot_vms_gone_without_an_event_were_evicted_where_eviction_deletes(eviction, evicted):
    """Spot evictions send no event; in a set whose evictionPolicy is Delete they lower the
    capacity as deletes do, so the new VM goes at once instead of after the wait."""
    run = Run(Fleet.of({"1": 1, "2": 3, "3": 3}, eviction_policy=eviction))
    record = _mid_move_drop(run)
    step = run.step(record)
    if evicted:
        last = step.record.history[-1]
        assert (last.state, last.reason) == (State.ROLLING_BACK, Reason.OUTSIDE_DELETE)
        assert "evicted (Spot, evictionPolicy Delete)" in last.detail
        assert step.commands
    else:
        assert step.record.state is State.AWAITING_HEALTH and step.record.cause_wait_since


def test_an_event_from_before_the_operation_does_not_explain_a_drop():
    run = Run(Fleet.of({"1": 1, "2": 3, "3": 3}))
    run.activity = OutsideActivity(vms_deleted_at=T0 - timedelta(minutes=1))
    record = _mid_move_drop(run)
    step = run.step(record)
    assert step.record.state is State.AWAITING_HEALTH and step.record.cause_wait_since


def test_a_new_vm_gone_to_a_repair_is_waited_for_then_followed_to_its_replacement():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, repairs=AutomaticRepairs())
    fleet.never_healthy.add("100")
    run = Run(fleet)
    record = run.start()
    fleet.tick()
    run.now += timedelta(minutes=5)
    record = run.step(record).record
    assert (record.state, record.kept) == (State.AWAITING_HEALTH, ("100",))
    del fleet.instances["100"]  # Replace deleted it; its replacement is not listed yet
    run.now += timedelta(minutes=30)
    waiting = run.step(record)
    assert waiting.record == record and waiting.commands == ()
    fleet.instances["101"] = vm("101", "1", health=Health.INITIALIZING)
    record = run.step(record).record
    assert (record.state, record.kept) == (State.AWAITING_HEALTH, ("101",))
    assert record.history[-1].reason is Reason.REPAIR_REPLACED
    assert {"100", "101"} <= set(record.created) and record.repaired == {"100": "101"}
    fleet.instances["101"] = vm("101", "1")
    record = run.until_done(record)
    assert record.state is State.SUCCEEDED
    assert fleet.totals() == (2, 2, 3)


def test_without_a_repairs_policy_the_same_change_is_someone_elses():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    fleet.never_healthy.add("100")
    run = Run(fleet)
    record = run.start()
    fleet.tick()
    run.now += timedelta(minutes=5)
    record = run.step(record).record
    del fleet.instances["100"]
    fleet.instances["101"] = vm("101", "1", health=Health.INITIALIZING)
    record = run.until_done(record)
    assert record.state is State.SUPERSEDED and record.repaired == {}


def test_scale_set_deleted_mid_operation():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    fleet.tick()
    step = advance(record, None, POLICY, T0 + timedelta(minutes=5))
    assert step.record.state is State.SUPERSEDED
    assert step.record.outcome is Reason.SCALE_SET_DELETED
    assert [type(c) for c in step.commands] == [Notify]
    fleet.provisioning_state = "Deleting"
    again = run.step(record)
    assert again.record.state is State.SUPERSEDED and not run.deleted()


def test_terminate_notification_delays_deletes_without_failing():
    fleet = Fleet.of(
        {"1": 1, "2": 3, "3": 3},
        terminate_notification=timedelta(minutes=15),
        delete_ticks=4,  # 20 minutes at 5-minute steps
    )
    run = Run(fleet, policy=OperationPolicy(delete_grace=timedelta(minutes=10)))
    record = run.until_done(run.start())
    assert record.state is State.SUCCEEDED
    deletes = run.of(DeleteInstances)
    assert len(deletes) == 1  # waited, never re-issued


def test_delete_stuck_past_notification_and_grace_fails():
    fleet = Fleet.of(
        {"1": 1, "2": 3, "3": 3}, terminate_notification=timedelta(minutes=5), delete_ticks=99
    )
    run = Run(fleet, policy=OperationPolicy(delete_grace=timedelta(minutes=5)))
    record = run.until_done(run.start())
    assert record.state is State.FAILED and record.outcome is Reason.DELETE_STUCK
    assert len(run.of(DeleteInstances)) == 1


def test_lost_delete_request_is_repeated_then_fails_bounded():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet, policy=OperationPolicy(max_attempts=2))
    record = _source_delete_lost_in_a_crash(fleet, run)
    first = record.delete_requested
    # the shell crashed before the delete: a later step repeats it, for the same ids, once the
    # retry interval (2 minutes by default) has passed
    soon = run.now + timedelta(minutes=1)
    assert advance(record, fleet.inventory(soon), run.policy, soon).commands == ()
    later = run.now + timedelta(minutes=2)
    step = advance(record, fleet.inventory(later), run.policy, later)
    assert step.commands == (DeleteInstances(tuple(sorted(first, key=int)), capacity=8),)
    # the interval doubles: 4 minutes after the repeat, attempts (2) are used up
    assert advance(step.record, fleet.inventory(later), run.policy, later).commands == ()
    last = later + timedelta(minutes=4)
    step = advance(step.record, fleet.inventory(last), run.policy, last)
    assert step.record.state is State.FAILED and step.record.outcome is Reason.DELETE_NOT_APPLIED


def test_repeat_of_a_source_delete_is_refused_when_the_new_vm_is_no_longer_healthy():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    while not record.delete_requested:
        fleet.tick()
        run.now += timedelta(minutes=5)
        record = advance(record, fleet.inventory(run.now), run.policy, run.now).record
    fleet.add(replace(fleet.instances["100"], health=Health.UNHEALTHY))
    later = run.now + timedelta(minutes=5)
    step = advance(record, fleet.inventory(later), run.policy, later)
    assert step.record.state is State.FAILED and step.record.outcome is Reason.DELETE_UNSAFE
    assert not [c for c in step.commands if isinstance(c, DeleteInstances)]


def test_lost_scale_out_is_repeated_then_fails():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    inventory = fleet.inventory(T0)
    policy = OperationPolicy(max_attempts=2)
    record, _ = start(inventory, assess(inventory), policy, T0, "op-1")
    assert advance(record, inventory, policy, T0 + timedelta(minutes=1)).commands == ()
    step = advance(record, inventory, policy, T0 + timedelta(minutes=2))
    assert step.commands == (SetCapacity(8),) and step.record.attempts == 2
    step = advance(step.record, inventory, policy, T0 + timedelta(minutes=6))
    assert step.record.state is State.FAILED and step.record.outcome is Reason.SCALE_OUT_NOT_APPLIED


def test_rejected_scale_out_fails_with_the_error_and_creates_nothing():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    inventory = fleet.inventory(T0)
    record, _ = start(inventory, assess(inventory), POLICY, T0, "op-1")
    record = scale_out_rejected(record, "quota: Standard DSv5 Family vCPUs 10 of 10 used", T0)
    step = advance(record, inventory, POLICY, T0 + timedelta(minutes=1))
    assert step.record.state is State.FAILED and step.record.outcome is Reason.SCALE_OUT_REJECTED
    assert "quota" in step.record.outcome_detail


def test_scale_out_still_creating_at_timeout_removes_what_it_created():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet, policy=OperationPolicy(scale_out_timeout=timedelta(minutes=10)))
    record = run.start()
    for minutes in (5, 10):
        step = advance(
            record,
            fleet.inventory(T0 + timedelta(minutes=minutes)),
            run.policy,
            T0 + timedelta(minutes=minutes),
        )
        record = step.record
    assert (
        record.state is State.ROLLING_BACK and record.history[-1].reason is Reason.SCALE_OUT_TIMEOUT
    )
    assert step.commands[0] == DeleteInstances(("100",), capacity=fleet.capacity)


def test_misplaced_new_vm_is_removed_with_the_source():
    # 0/3/3 needs two VMs in zone 1, which has room for one: the second lands in zone 2
    fleet = Fleet.of({"1": 0, "2": 3, "3": 3}, zone_room={"1": 1})
    run = Run(fleet, policy=OperationPolicy(max_surge=3))
    record = run.start()
    assert record.k == 2 and record.zone_needs == {"1": 2}
    record = run.until_done(record)
    assert record.state is State.SUCCEEDED
    assert record.kept == ("100",) and record.discarded == ("101",)
    assert record.created == {"100": "1", "101": "2"}
    assert run.deleted() == {"101", record.sources[0]}
    assert fleet.capacity == 6 and sorted(fleet.totals()) == [1, 2, 3]


def test_misplaced_new_vm_in_the_fullest_zone_is_never_taken_as_a_source():
    fleet = Fleet.of({"1": 0, "2": 2, "3": 4}, zone_room={"1": 1, "2": 0})
    run = Run(fleet, policy=OperationPolicy(max_surge=2))
    record = run.until_done(run.start())
    assert record.created == {"100": "1", "101": "3"}
    assert record.state is State.SUCCEEDED
    assert record.kept == ("100",) and record.discarded == ("101",)
    assert record.sources == ("5",) and run.deleted() == {"5", "101"}
    assert fleet.totals() == (1, 2, 3)


def test_platform_policy_enabled_mid_operation_removes_only_what_it_created():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    fleet.tick()
    run.now += timedelta(minutes=5)
    record = run.step(record).record
    fleet.platform_rebalancing = True
    record = run.until_done(record)
    assert record.state is State.ROLLED_BACK
    assert any(t.reason is Reason.STAND_DOWN for t in record.history)
    assert run.deleted() == {"100"} and fleet.totals() == (1, 3, 3)


def test_opt_out_before_the_scale_out_is_visible_starts_nothing():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    inventory = fleet.inventory(T0)
    record, _ = start(inventory, assess(inventory), POLICY, T0, "op-1")
    step = advance(record, inventory, POLICY, T0, stand_down="tag zone-rebalance=disabled")
    assert step.record.state is State.SUPERSEDED and step.record.outcome is Reason.STAND_DOWN
    assert not any(isinstance(c, SetCapacity) for c in step.commands)


def test_outside_update_blocks_the_delete_until_it_ends():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    while record.state is not State.SCALING_IN:
        fleet.tick()
        run.now += timedelta(minutes=5)
        record = run.step(record).record
    fleet.provisioning_state = "Updating"
    assert run.step(record).commands == ()
    fleet.provisioning_state = "Succeeded"
    assert isinstance(run.step(record).commands[0], DeleteInstances)


def test_an_outside_update_that_never_ends_removes_the_new_vms_and_no_source():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    while record.state is not State.SCALING_IN:
        fleet.tick()
        run.now += timedelta(minutes=5)
        record = run.step(record).record
    fleet.provisioning_state = "Updating"
    later = (record.health_deadline or run.now) + POLICY.scale_out_timeout
    step = advance(record, fleet.inventory(later), POLICY, later)
    assert step.record.state is State.ROLLING_BACK
    # Azure would refuse a delete while the update runs: the rollback is only recorded.
    assert not [c for c in step.commands if isinstance(c, DeleteInstances)]
    later += timedelta(minutes=5)
    step = advance(step.record, fleet.inventory(later), POLICY, later)
    assert not step.commands
    fleet.provisioning_state = "Succeeded"
    later += timedelta(minutes=5)
    step = advance(step.record, fleet.inventory(later), POLICY, later)
    (delete,) = [c for c in step.commands if isinstance(c, DeleteInstances)]
    assert set(delete.ids) == set(record.created)
    fleet.apply(step.commands)
    for _ in range(4):
        fleet.tick()
    later += timedelta(minutes=20)
    step = advance(step.record, fleet.inventory(later), POLICY, later)
    assert step.record.state is State.SUPERSEDED and step.record.outcome is Reason.SCALE_SET_BUSY
    assert fleet.capacity == 7 and fleet.totals() == (1, 3, 3)


# --- crash safety ---------------------------------------------------------------------------


def test_same_step_twice_gives_the_same_idempotent_commands():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.start()
    seen = 0
    while not record.state.terminal:
        fleet.tick()
        run.now += timedelta(minutes=5)
        inventory = fleet.inventory(run.now)
        first = advance(record, inventory, POLICY, run.now)
        second = advance(record, inventory, POLICY, run.now)
        assert first == second
        for command in first.commands:
            if isinstance(command, DeleteInstances):
                assert set(command.ids) <= set(inventory.by_id())
                seen += 1
            assert not isinstance(command, SetCapacity) or command.capacity == 8
        # the command ran but the process died before the next record was written: the old
        # record meets the new observation and must not issue anything new or harmful
        fleet.apply(first.commands)
        replay = advance(record, fleet.inventory(run.now), POLICY, run.now)
        for command in replay.commands:
            if isinstance(command, DeleteInstances):
                assert set(command.ids) <= set(first.record.delete_requested) | set(
                    record.delete_requested
                ) or all(i in record.created for i in command.ids)
        record = first.record
    assert record.state is State.SUCCEEDED and seen == 1


def test_unchanged_step_keeps_the_record_identical():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, never_healthy={"100"})
    run = Run(fleet)
    record = run.start()
    for _ in range(3):
        fleet.tick()
        run.now += timedelta(minutes=5)
        record = run.step(record).record
    assert record.state is State.AWAITING_HEALTH
    later = run.now + timedelta(minutes=1)
    step = advance(record, fleet.inventory(later), POLICY, later)
    assert step.record is record and step.commands == ()


# --- the record -----------------------------------------------------------------------------


def test_json_round_trip_is_exact_at_every_step():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = run.until_done(run.start())
    record = record.with_arm_call("req-1/corr-1")
    assert len(run.records) > 4
    for each in [*run.records, record]:
        text = each.to_json()
        assert OperationRecord.from_json(text) == each
        assert json.loads(text)["schema"] == 1


@pytest.mark.parametrize("mode", list(OrchestrationMode))
def test_record_for_a_1000_vm_set_with_k_10_stays_small(mode):
    fleet = Fleet(mode=mode)
    for n in range(1000):
        zone = "1" if n < 100 else ("2" if n < 550 else "3")
        suffix = f"{n * 2654435761 % 2**32:08x}"  # Flexible names end in random-looking hex
        vm_id = str(n * 7 + 3) if mode is OrchestrationMode.UNIFORM else f"vmss-web_{suffix}"
        fleet.instances[vm_id] = vm(vm_id, zone)
    fleet.capacity = 1000
    inventory = fleet.inventory(T0)
    record, _ = start(inventory, assess(inventory), OperationPolicy(max_surge=10), T0, "op-1")
    created = {f"new-{n}": "1" for n in range(10)}
    record = replace(
        record,
        created=created,
        kept=tuple(created),
        delete_requested=dict.fromkeys(created, T0),
        arm_calls=tuple(f"{n:032x}" for n in range(20)),
    )
    text = record.to_json()
    assert len(text.encode()) < 20_000
    assert OperationRecord.from_json(text).baseline.instance_ids == frozenset(fleet.instances)


def test_from_json_rejects_other_schemas_with_a_clear_error():
    with pytest.raises(ValueError, match="schema 99"):
        OperationRecord.from_json('{"schema": 99}')
    with pytest.raises(ValueError, match="not valid JSON"):
        OperationRecord.from_json("{")


def test_start_refuses_an_assessment_without_moves():
    fleet = Fleet.of({"1": 2, "2": 2, "3": 2})
    inventory = fleet.inventory(T0)
    with pytest.raises(ValueError, match="no moves"):
        start(inventory, assess(inventory), POLICY, T0, "op-1")


def test_describe_says_what_it_waits_for():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, never_healthy={"100"})
    run = Run(fleet)
    record = run.start()
    assert "capacity 7 -> 8" in describe(record, T0)
    for _ in range(2):
        fleet.tick()
        run.now += timedelta(minutes=5)
        record = run.step(record).record
    text = describe(record, run.now)
    assert "Waiting for new VM(s) 100 to report healthy" in text and "min left" in text
    record = run.until_done(record)
    assert "Ended" in describe(record, run.now) and "VMs created by it: 100" in describe(
        record, run.now
    )


def test_capacity_raised_but_no_vm_appears_fails_without_scaling_in():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    inventory = fleet.inventory(T0)
    policy = OperationPolicy(scale_out_timeout=timedelta(minutes=10))
    record, _ = start(inventory, assess(inventory), policy, T0, "op-1")
    fleet.capacity = 8  # the model says 8, yet no VM shows up
    waiting = advance(record, fleet.inventory(T0), policy, T0 + timedelta(minutes=5))
    assert waiting.record.state is State.SCALING_OUT and waiting.commands == ()
    later = T0 + timedelta(minutes=10)
    step = advance(waiting.record, fleet.inventory(later), policy, later)
    assert step.record.state is State.FAILED and step.record.outcome is Reason.NO_NEW_VMS
    assert not [c for c in step.commands if isinstance(c, SetCapacity | DeleteInstances)]


def test_a_planned_record_requests_the_scale_out_on_its_first_step():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    inventory = fleet.inventory(T0)
    record, _ = start(inventory, assess(inventory), POLICY, T0, "op-1")
    planned = replace(record, state=State.PLANNED, history=())
    step = advance(planned, inventory, POLICY, T0)
    assert step.record.state is State.SCALING_OUT
    assert step.commands[0] == SetCapacity(8)


def test_flexible_vm_names_flow_through_as_ids():
    fleet = Fleet(mode=OrchestrationMode.FLEXIBLE)
    for number, zone in enumerate("1222333"):
        name = f"vmss-web_{number:08x}"
        fleet.instances[name] = replace(vm(name, zone), name=name)
    fleet.capacity = 7
    run = Run(fleet)
    record = run.until_done(run.start())
    assert record.state is State.SUCCEEDED and record.mode is OrchestrationMode.FLEXIBLE
    assert record.sources[0].startswith("vmss-web_") and fleet.capacity == 7
    assert OperationRecord.from_json(record.to_json()) == record


# --- against armsim, through the real Compute adapter and SDK ------------------------------


def drive_on_armsim(spec, policy=POLICY, capacity=(), step=60.0, disturb=None, faults=()):
    """Run one operation against armsim: observe with the real adapter, advance, act.

    `disturb(sim, record)` runs once, as an outside actor, when the record is awaiting health.
    Returns the final record, the ids of every delete requested, and armsim's scale set.
    """
    from armsim import ArmSim, Scenario
    from devkit.stack import compute_for, settings_for
    from rebalancer.compute.errors import ScaleSetGone

    with ArmSim.start(Scenario(scale_sets=(spec,), capacity=capacity)) as sim:
        for rule in faults:
            sim.faults.add(rule)
        compute = compute_for(sim, settings_for(sim))
        try:
            ref = ScaleSetRef.parse(sim.scale_set(spec.resource_group, spec.name).id)
            inventory = compute.read_inventory(ref, sim.clock.now())
            record, commands = start(inventory, assess(inventory), policy, sim.clock.now(), "op")
            deleted: list[str] = []
            for _ in range(300):
                for command in commands:
                    if isinstance(command, SetCapacity):
                        compute.set_capacity(ref, command.capacity)
                    elif isinstance(command, DeleteInstances):
                        deleted.extend(command.ids)
                        compute.delete_instances(ref, command.ids)
                if record.state.terminal:
                    break
                sim.advance(step)
                if disturb and record.state is State.AWAITING_HEALTH:
                    disturb(sim, record)
                    disturb = None
                try:
                    observation = compute.read_inventory(ref, sim.clock.now())
                except ScaleSetGone:
                    observation = None
                step_ = advance(record, observation, policy, sim.clock.now())
                record, commands = step_.record, step_.commands
            assert record.state.terminal, describe(record, sim.clock.now())
            gone = observation is None
            final = None if gone else sim.scale_set(spec.resource_group, spec.name)
            return record, deleted, final
        finally:
            compute.close()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["Uniform", "Flexible"])
def test_armsim_2_4_7_with_deallocated_vms(mode):
    from armsim import ScaleSetSpec, VmOverride

    spec = ScaleSetSpec(
        "web",
        "rg",
        mode=mode,
        counts={"1": 2, "2": 4, "3": 7},
        overrides=(VmOverride(zone="3", count=2, power_state="deallocated"),),
    )
    record, deleted, final = drive_on_armsim(spec, OperationPolicy(max_surge=2))
    assert record.state is State.SUCCEEDED and len(deleted) == 2
    assert final.zone_counts() == {"1": 4, "2": 4, "3": 5} and final.capacity == 13
    assert all(final.vm(vm_id).health == "healthy" for vm_id in record.kept)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["Uniform", "Flexible"])
def test_armsim_zone_without_capacity_rolls_back(mode):
    from armsim import ScaleSetSpec
    from armsim.scenario import ZoneCapacity

    spec = ScaleSetSpec("web", "rg", mode=mode, counts={"1": 1, "2": 3, "3": 3})
    no_room = (ZoneCapacity("westeurope", "Standard_D2s_v5", "1", 0),)
    record, deleted, final = drive_on_armsim(spec, capacity=no_room)
    assert record.state is State.ROLLED_BACK
    # `created` also names the extras a Uniform scale-out overprovisioned; Azure removed those.
    assert deleted and set(deleted) <= set(record.created)
    assert final.zone_counts() == {"1": 1, "2": 3, "3": 3} and final.capacity == 7


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["Uniform", "Flexible"])
def test_armsim_new_vm_with_a_failed_extension_is_removed_without_backoff(mode):
    from armsim import ScaleSetSpec
    from armsim.faults import FaultRule

    # Not overprovisioned: an extra VM would stand in for the failed one, and the move succeed.
    spec = ScaleSetSpec(
        "web", "rg", mode=mode, counts={"1": 1, "2": 3, "3": 3}, overprovision=False
    )
    failing = FaultRule("provisioning_failure", code="VMExtensionProvisioningError", count=1)
    record, deleted, final = drive_on_armsim(spec, faults=(failing,))
    assert record.state is State.ROLLED_BACK
    assert record.history[1].reason is Reason.NEW_VM_FAILED
    assert "VMExtensionProvisioningError" in record.history[1].detail
    assert deleted == list(record.created) and final.zone_counts() == {"1": 1, "2": 3, "3": 3}


@pytest.mark.integration
@pytest.mark.parametrize("source_health", ["healthy", "unhealthy"])
def test_armsim_new_vm_never_healthy(source_health):
    from armsim import ScaleSetSpec, VmOverride

    spec = ScaleSetSpec(
        "web",
        "rg",
        counts={"1": 1, "2": 3, "3": 3},
        new_vm_health="unhealthy",
        overrides=(VmOverride(zone="2", count=3, health=source_health),),
    )
    record, deleted, final = drive_on_armsim(spec, step=600.0)
    if source_health == "healthy":
        assert record.state is State.ROLLED_BACK and deleted == list(record.created)
        assert final.zone_counts() == {"1": 1, "2": 3, "3": 3}
    else:
        assert record.state is State.SUCCEEDED and record.sources == tuple(deleted)
        remaining = {vm.instance_id for vm in final.vms}
        assert deleted[0] not in remaining and record.kept[0] in remaining
        assert sorted(final.zone_counts().values()) == [2, 2, 3]


@pytest.mark.integration
def test_armsim_autoscale_mid_operation_supersedes():
    from armsim import ScaleSetSpec

    spec = ScaleSetSpec("web", "rg", mode="Flexible", counts={"1": 1, "2": 3, "3": 3})
    record, deleted, final = drive_on_armsim(
        spec, disturb=lambda sim, _: sim.actor.set_capacity("rg", "web", 10)
    )
    assert record.state is State.SUPERSEDED and record.outcome is Reason.CAPACITY_CHANGED
    assert deleted == [] and final.capacity == 10


def test_new_vms_seen_before_the_capacity_during_an_update_are_waited_for():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    inventory = fleet.inventory(T0)
    record, _ = start(inventory, assess(inventory), POLICY, T0, "op-1")
    fleet.add(vm("100", "1", state="Creating", health=Health.NOT_REPORTED))
    fleet.capacity, fleet.provisioning_state = 7, "Updating"
    step = advance(record, fleet.inventory(T0), POLICY, T0 + timedelta(minutes=1))
    assert step.record.state is State.SCALING_OUT and step.commands == ()
    assert step.record.created == {"100": "1"}
    fleet.provisioning_state = "Succeeded"  # settled, and still not our capacity: not ours
    step = advance(step.record, fleet.inventory(T0), POLICY, T0 + timedelta(minutes=2))
    assert step.record.state is State.SUPERSEDED
    assert step.record.outcome is Reason.UNEXPECTED_INSTANCES


def test_a_delete_the_record_does_not_know_about_is_never_added_to():
    # Capacity that drops only once a VM is gone hides a delete in flight. A delete no record
    # asked for is someone else's (the shell commits a step before sending its deletes): no
    # source is deleted beside it, and the operation removes only the VMs it created, so the
    # scale set ends at the capacity its owners left it.
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3}, capacity_drops_when_gone=True, delete_ticks=3)
    run = Run(fleet)
    record = run.start()
    while record.state is not State.SCALING_IN:
        fleet.tick()
        run.now += timedelta(minutes=5)
        record = run.step(record).record
    lost = advance(record, fleet.inventory(run.now), POLICY, run.now)
    (source,) = lost.record.sources
    fleet.apply(lost.commands)  # the delete ran; its record never made it to storage
    fleet.tick()
    later = run.now + timedelta(minutes=5)
    assert fleet.capacity == 8 and fleet.instances[source].deleting
    step = advance(record, fleet.inventory(later), POLICY, later)
    assert step.record.state is State.ROLLING_BACK
    assert step.record.history[-1].reason is Reason.OUTSIDE_DELETE
    (delete,) = [c for c in step.commands if isinstance(c, DeleteInstances)]
    assert set(delete.ids) == set(record.kept) and source not in delete.ids
    fleet.apply(step.commands)
    for _ in range(4):
        fleet.tick()
    later += timedelta(minutes=20)
    step = advance(step.record, fleet.inventory(later), POLICY, later)
    assert step.record.state is State.SUPERSEDED and step.record.outcome is Reason.OUTSIDE_DELETE
    assert fleet.capacity == 6  # the 7 it started from, less the VM deleted outside it


def test_a_new_vm_is_never_paired_with_a_source_of_the_other_priority():
    """Azure chose the new VM's priority (a priority mix) unlike every source left: the new
    VM is removed instead, so the split of Spot and regular VMs ends as it began."""
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    for instance in list(fleet.instances.values()):
        if instance.zone in ("2", "3"):
            fleet.instances[instance.id] = replace(instance, spot=True)
    run = Run(fleet)
    record = run.until_done(run.start())
    assert fleet.instances.get("100") is None or fleet.instances["100"].deleting
    assert record.state is State.ROLLED_BACK and record.sources == ()
    assert "no regular source in a fuller zone" in " ".join(t.detail for t in record.history)
    assert run.deleted() == {"100"}
    assert fleet.totals() == (1, 3, 3)
    assert sum(1 for i in fleet.instances.values() if i.spot and not i.deleting) == 6


def _source_delete_lost_in_a_crash(fleet: Fleet, run: Run) -> OperationRecord:
    """Drive to the source's delete and drop it, as a crash between the record's write and
    the request would: the record says requested, Azure never heard of it."""
    record = run.start()
    while not record.delete_requested:
        fleet.tick()
        run.now += timedelta(minutes=5)
        step = advance(record, fleet.inventory(run.now), run.policy, run.now)
        record = step.record
        fleet.apply(tuple(c for c in step.commands if not isinstance(c, DeleteInstances)))
    return record


def _bystander(fleet: Fleet, record: OperationRecord) -> str:
    return next(
        i.id
        for i in fleet.instances.values()
        if i.id in record.baseline.instance_ids and i.id not in record.sources
    )


def _lost_delete_then_one_vm_less() -> tuple[Fleet, Run, OperationRecord]:
    """The source's delete is lost; then another VM of the owners goes and the capacity drops
    by one: a delete of theirs or a lower capacity written, as the events will say."""
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = _source_delete_lost_in_a_crash(fleet, run)
    fleet.delete((_bystander(fleet, record),))
    return fleet, run, record


def test_a_lost_delete_is_not_repeated_on_top_of_a_capacity_someone_wrote():
    """The source's delete never reached Azure; then someone wrote a capacity one lower and
    Azure removed another VM to meet it. Repeating the delete would leave the scale set one
    below what they wrote: the write counts the VMs there in, so the move ends there."""
    fleet, run, record = _lost_delete_then_one_vm_less()
    run.now += timedelta(minutes=5)
    run.activity = OutsideActivity(capacity_written_at=run.now - timedelta(minutes=1))
    step = run.step(record)
    assert (step.record.state, step.record.outcome) == (State.SUPERSEDED, Reason.CAPACITY_CHANGED)
    assert not run.of(DeleteInstances)
    assert set(record.sources) <= set(fleet.instances)


def test_a_lost_delete_goes_on_when_someone_deleted_a_vm():
    """The same, but the event says a VM was deleted: the owners keep one VM fewer, and the
    move, capacity-neutral, still deletes its source."""
    fleet, run, record = _lost_delete_then_one_vm_less()
    run.now += timedelta(minutes=5)
    run.activity = OutsideActivity(vms_deleted_at=run.now - timedelta(minutes=1))
    step = run.step(record)
    assert step.commands == (DeleteInstances(record.sources, capacity=fleet.capacity + 1),)
    assert run.until_done(step.record).state is State.SUCCEEDED


def test_a_lost_delete_waits_for_the_event_then_keeps_the_vms():
    _, run, record = _lost_delete_then_one_vm_less()
    waited = timedelta(0)
    while not record.state.terminal:
        run.now += timedelta(minutes=5)
        waited += timedelta(minutes=5)
        record = run.step(record).record
    assert waited > run.policy.outside_cause_wait
    assert (record.state, record.outcome) == (State.SUPERSEDED, Reason.CAPACITY_CHANGED)
    assert not run.of(DeleteInstances)


def test_a_lost_delete_is_not_repeated_after_a_higher_capacity_was_written():
    fleet = Fleet.of({"1": 1, "2": 3, "3": 3})
    run = Run(fleet)
    record = _source_delete_lost_in_a_crash(fleet, run)
    fleet.set_capacity(fleet.capacity + 2)
    run.now += timedelta(minutes=5)
    step = run.step(record)
    assert (step.record.state, step.record.outcome) == (State.SUPERSEDED, Reason.CAPACITY_CHANGED)
    assert not run.of(DeleteInstances)
