"""Properties of the operation over random fleets, random timing, crashes and outside actors.

Each example builds an imbalanced fleet, starts an operation, then for a number of steps lets
random things happen between observations: time passes, the platform provisions and deletes,
the shell crashes before or after running a step's commands, and outside actors scale, delete,
protect, deallocate, flip health, update or delete the scale set. At every step the safety
invariants of docs/safety.md that the pure machine is responsible for are checked on the
observation the step was decided on.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from rebalancer.evaluator import assess, zone_counts
from rebalancer.model import AutomaticRepairs, Health, Instance, Inventory, PowerState
from rebalancer.operation import (
    DeleteInstances,
    OperationPolicy,
    OperationRecord,
    SetCapacity,
    State,
    Step,
    advance,
    start,
)
from tests.test_operation import T0, Fleet, vm

HEALTHS = (Health.HEALTHY, Health.HEALTHY, Health.HEALTHY, Health.UNHEALTHY, Health.UNKNOWN)
OUTSIDE = (
    "scale_out",
    "scale_in",
    "delete_vm",
    "protect",
    "unprotect",
    "unhealthy",
    "healthy",
    "deallocate",
    "repair",
    "updating",
    "platform_policy",
    "scale_set_gone",
)


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    zones = draw(st.sampled_from([("1", "2"), ("1", "2", "3")]))
    fleet = Fleet(zones=zones)
    number = 0
    for zone in zones:
        for _ in range(draw(st.integers(0, 6))):
            power = draw(st.sampled_from([PowerState.RUNNING] * 4 + [PowerState.DEALLOCATED]))
            health = draw(st.sampled_from(HEALTHS))
            fleet.instances[str(number)] = replace(
                vm(str(number), zone, health=health, power=power),
                protect_from_scale_in=draw(st.booleans()) and draw(st.booleans()),
                latest_model=draw(st.booleans()),
            )
            number += 1
    fleet.capacity = len(fleet.instances)
    fleet.zone_room = draw(st.dictionaries(st.sampled_from(zones), st.integers(0, 2), max_size=2))
    fleet.never_healthy = draw(st.sets(st.sampled_from([str(n) for n in range(100, 104)])))
    fleet.terminate_notification = draw(st.sampled_from([None, timedelta(minutes=10)]))
    fleet.delete_ticks = draw(st.integers(1, 4))
    fleet.capacity_drops_when_gone = draw(st.booleans())
    fleet.repairs = AutomaticRepairs() if draw(st.booleans()) else None
    return fleet


policies = st.builds(
    OperationPolicy,
    max_surge=st.integers(1, 3),
    health_timeout=st.sampled_from([timedelta(minutes=30), timedelta(minutes=90)]),
    scale_out_timeout=st.sampled_from([timedelta(minutes=15), timedelta(minutes=30)]),
    delete_grace=st.sampled_from([timedelta(minutes=5), timedelta(minutes=15)]),
    max_attempts=st.integers(1, 4),
    retry_interval=st.sampled_from([timedelta(minutes=1), timedelta(minutes=2)]),
)


def act_outside(fleet: Fleet, action: str, pick: int) -> bool:
    """One outside actor's change; False when the scale set is now gone."""
    live = sorted((i for i in fleet.instances.values() if not i.deleting), key=Instance.sort_id)
    target = live[pick % len(live)] if live else None
    if action == "scale_set_gone":
        return False
    if action == "scale_out":
        fleet.set_capacity(fleet.capacity + 1)
    elif action == "scale_in" and fleet.capacity > 0 and live:
        fleet.set_capacity(fleet.capacity - 1)
    elif action == "delete_vm" and target:
        fleet.delete((target.id,))
    elif action == "protect" and target:
        fleet.add(replace(target, protect_from_scale_set_actions=True))
    elif action == "unprotect" and target:
        fleet.add(
            replace(target, protect_from_scale_in=False, protect_from_scale_set_actions=False)
        )
    elif action == "unhealthy" and target:
        fleet.add(replace(target, health=Health.UNHEALTHY))
    elif action == "healthy" and target and target.provisioning_state == "Succeeded":
        fleet.add(replace(target, health=Health.HEALTHY))
    elif action == "deallocate" and target:
        fleet.add(replace(target, power_state=PowerState.DEALLOCATED))
    elif action == "repair" and target and fleet.repairs and not target.healthy:
        # Only an automatic repairs policy (Replace) replaces a VM, and only one that reports
        # unhealthy or unknown: the old one goes, a new id appears, capacity stays
        del fleet.instances[target.id]
        fleet.instances[str(fleet.next_id)] = vm(str(fleet.next_id), target.zone or "1")
        fleet.next_id += 1
    elif action == "updating":
        fleet.provisioning_state = "Updating"
    elif action == "platform_policy":
        fleet.platform_rebalancing = True
    return True


def check_step(
    before: OperationRecord,
    observation: Inventory | None,
    step: Step,
    policy: OperationPolicy,
    now: datetime,
) -> None:
    """The invariants one decision must keep, judged on the observation it was made from."""
    record = step.record
    assert record.k <= policy.max_surge and record.k == before.k
    assert record.target_capacity == record.baseline.capacity + record.k
    again = advance(before, observation, policy, now)
    assert again == step, "a step must be a function of (record, observation, now)"
    for command in step.commands:
        assert not isinstance(command, SetCapacity) or command.capacity == record.target_capacity
    if observation is None:
        assert record.state.terminal
        assert not [c for c in step.commands if isinstance(c, DeleteInstances)]
        return
    by_id = observation.by_id()
    for vm_id in by_id:
        if vm_id not in record.baseline.instance_ids and not before.state.terminal:
            # a repair's replacement of one of the owners' VMs is theirs, tracked as such
            tracked = vm_id in record.created or vm_id in record.repaired.values()
            assert tracked, f"new VM {vm_id} not tracked"
    deleted: set[str] = set()
    for command in step.commands:
        if isinstance(command, DeleteInstances):
            deleted |= set(command.ids)
    for vm_id in deleted:
        assert vm_id in by_id, f"delete of {vm_id}, not in the latest observation"
        assert not by_id[vm_id].protected, f"delete of protected {vm_id}"
        assert not by_id[vm_id].deleting, f"delete of {vm_id}, already deleting (Azure rejects it)"
    assert len(record.kept) + len(record.discarded) <= record.k, "more new VMs than requested"
    assert not deleted & set(record.kept), "a kept new VM is never deleted"
    assert not set(record.sources) & set(record.created), "a source is never a VM we created"
    originals = {v for v in deleted if v not in record.created}
    if originals:
        assert originals <= set(record.sources)
        replacements = [
            by_id[v]
            for v in record.kept
            if v in by_id and v not in deleted and not by_id[v].deleting
        ]
        healthy_originals = sum(1 for v in originals if by_id[v].healthy)
        healthy_replacements = sum(1 for i in replacements if i.healthy)
        # a source goes only with a replacement; a healthy one only with a healthy replacement
        assert len(originals) <= len(replacements)
        assert healthy_originals <= healthy_replacements
        assert before.state in (State.AWAITING_HEALTH, State.SCALING_IN)


def observe(fleet: Fleet, gone: bool, now: datetime) -> Inventory | None:
    return None if gone else fleet.inventory(now)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(fleet=fleets(), policy=policies, data=st.data())
def test_invariants_hold_under_crashes_and_outside_actors(fleet, policy, data):
    inventory = fleet.inventory(T0)
    assessment = assess(inventory)
    assume(assessment.moves)
    record, commands = start(inventory, assessment, policy, T0, "op-p")
    assert record.k == min(len(assessment.moves), policy.max_surge)
    assert commands[0] == SetCapacity(record.target_capacity)
    fleet.apply(commands)
    now = T0
    gone = False
    quiet_from = data.draw(st.integers(0, 30), label="outside actors stop after step")
    for number in range(400):
        fleet.tick()
        now += timedelta(minutes=data.draw(st.sampled_from([1, 5, 20]), label="minutes"))
        if number < quiet_from and data.draw(st.integers(0, 4), label="outside?") == 0:
            action = data.draw(st.sampled_from(OUTSIDE), label="outside action")
            gone = gone or not act_outside(fleet, action, data.draw(st.integers(0, 50)))
        observation = observe(fleet, gone, now)
        step = advance(record, observation, policy, now)
        check_step(record, observation, step, policy, now)
        stored = OperationRecord.from_json(step.record.to_json())
        assert stored == step.record, "the record round-trips exactly"
        crash = data.draw(st.sampled_from(["none"] * 6 + ["before", "after"]), label="crash")
        if crash == "before":
            # the record was written, the process died before running the commands
            record = stored
        elif crash == "after":
            # the commands ran, the process died before writing the next record
            fleet.apply(step.commands)
        else:
            record = stored
            fleet.apply(step.commands)
        if record.state.terminal:
            break
    assert record.state.terminal, f"not finished: {record.state} {record.history[-3:]}"
    event(f"ended {record.state.value} ({record.outcome})")
    for vm_id in fleet.instances:
        if vm_id not in record.baseline.instance_ids:
            assert vm_id in record.created or vm_id in record.repaired.values() or gone


@settings(max_examples=100, deadline=None)
@given(fleet=fleets(), policy=policies)
def test_undisturbed_operation_never_worsens_balance_or_health(fleet, policy):
    inventory = fleet.inventory(T0)
    assessment = assess(inventory)
    assume(assessment.moves)
    fleet.zone_room = {}
    fleet.delete_ticks = 1
    healthy_before = fleet.healthy()
    spread_before = max(fleet.totals()) - min(fleet.totals())
    record, commands = start(inventory, assessment, policy, T0, "op-p")
    fleet.apply(commands)
    now = T0
    for _ in range(200):
        fleet.tick()
        now += timedelta(minutes=5)
        step = advance(record, fleet.inventory(now), policy, now)
        check_step(record, fleet.inventory(now), step, policy, now)
        fleet.apply(step.commands)
        record = step.record
        assert fleet.healthy() >= healthy_before
        if record.state.terminal:
            break
    assert record.state in (State.SUCCEEDED, State.ROLLED_BACK), record.history
    event(f"ended {record.state.value} ({record.outcome})")
    counts = zone_counts(fleet.scale_set(), fleet.instances.values())
    totals = [c.total for c in counts.values()]
    assert max(totals) - min(totals) <= spread_before
    assert fleet.capacity == record.baseline.capacity
    if record.state is State.SUCCEEDED:
        assert max(totals) - min(totals) < spread_before or len(record.kept) < record.k


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    fleet=fleets(),
    policy=policies,
    actions=st.lists(st.tuples(st.sampled_from(OUTSIDE[:-1]), st.integers(0, 50)), max_size=3),
)
def test_repeating_a_lost_delete_is_safe_whatever_changed_meanwhile(fleet, policy, actions):
    policy = replace(policy, max_attempts=max(policy.max_attempts, 2))
    inventory = fleet.inventory(T0)
    assessment = assess(inventory)
    assume(assessment.moves)
    fleet.zone_room = {}
    record, commands = start(inventory, assessment, policy, T0, "op-p")
    fleet.apply(commands)
    now = T0
    for _ in range(100):
        fleet.tick()
        now += timedelta(minutes=5)
        step = advance(record, fleet.inventory(now), policy, now)
        record = step.record
        if record.delete_requested or record.state.terminal:
            break  # the process dies here: the delete request is never sent
        fleet.apply(step.commands)
    assume(record.delete_requested and not record.state.terminal)
    for action, pick in actions:
        act_outside(fleet, action, pick)
    now += timedelta(minutes=5)
    observation = fleet.inventory(now)
    step = advance(record, observation, policy, now)
    check_step(record, observation, step, policy, now)
    event(f"after the lost delete: {step.record.state.value} ({step.record.outcome})")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(fleet=fleets(), policy=policies, data=st.data())
def test_crashes_anywhere_never_add_up_to_an_unsafe_end(fleet, policy, data):
    """Crashes alone (no outside actors), at any step, in either place: when the operation has
    ended, no more original VMs are gone than new VMs remain beside them, and the scale set
    has at least as many healthy VMs as at the start."""
    inventory = fleet.inventory(T0)
    assessment = assess(inventory)
    assume(assessment.moves)
    healthy_before = fleet.healthy()
    record, commands = start(inventory, assessment, policy, T0, "op-p")
    if data.draw(st.booleans(), label="first scale-out lost"):
        commands = ()
    fleet.apply(commands)
    now = T0
    for _ in range(400):
        fleet.tick()
        now += timedelta(minutes=data.draw(st.sampled_from([1, 5, 20]), label="minutes"))
        observation = fleet.inventory(now)
        step = advance(record, observation, policy, now)
        check_step(record, observation, step, policy, now)
        crash = data.draw(st.sampled_from(["none"] * 4 + ["before", "after"]), label="crash")
        if crash == "after" and any(isinstance(c, DeleteInstances) for c in step.commands):
            # The shell commits a step's record before it sends the step's deletes, so a
            # delete never runs without its record; a VM deleted that no record asked for is
            # someone else's doing, and the operation removes its own VMs then.
            crash = "none"
        if crash != "before":
            fleet.apply(step.commands)
        if crash != "after":
            record = step.record
        if record.state.terminal:
            break
    assert record.state.terminal, record.history[-3:]
    for _ in range(20):  # let requested deletes finish
        fleet.tick()
    originals_gone = record.baseline.instance_ids - set(fleet.instances) - record.baseline.deleting
    new_remaining = [vm_id for vm_id in fleet.instances if vm_id in record.created]
    assert len(originals_gone) <= len(new_remaining)
    assert fleet.healthy() >= healthy_before
    event(f"ended {record.state.value} ({record.outcome})")
