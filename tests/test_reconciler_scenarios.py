"""The issue's end-to-end scenarios, Uniform and Flexible, against armsim and Azurite through
the real SDK clients. After every tick the invariants of docs/safety.md are checked
(devkit/invariants.py): no protected VM deleted, no source deleted before its replacement was
healthy, every VM the app created tracked, one operation per scale set, healthy count kept."""

from __future__ import annotations

from datetime import timedelta

import pytest

from armsim import QuotaSpec, ScaleSetSpec, Scenario, VmOverride, ZoneCapacity
from devkit.invariants import own_new_vms
from devkit.stack import Drive, running_stack
from rebalancer.model import ScaleSetRef
from rebalancer.operation import Reason, State
from rebalancer.verdict import Outcome

ENABLED = {"zone-rebalance": "enabled"}
MODES = ["Uniform", "Flexible"]


def web(mode: str, counts: dict[str, int], **options) -> Scenario:
    extra = {k: options.pop(k) for k in ("capacity", "quotas") if k in options}
    spec = ScaleSetSpec("web", "rg-web", mode=mode, counts=counts, tags=ENABLED, **options)
    return Scenario(scale_sets=(spec,), **extra)


def ids(view) -> set[str]:
    return {vm.instance_id for vm in view.vms}


@pytest.mark.parametrize("mode", MODES)
def test_1_3_3_is_balanced_by_one_move(store, mode):
    with running_stack(web(mode, {"1": 1, "2": 3, "3": 3}), store) as stack:
        before = ids(stack.sim.scale_set("rg-web", "web"))
        run = Drive(stack)
        run.until_settled()
        after = stack.sim.scale_set("rg-web", "web")
        assert sorted(after.zone_counts().values()) == [2, 2, 3]
        assert after.capacity == 7
        assert len(before - ids(after)) == 1
        (record,) = run.records()
        assert record.state is State.SUCCEEDED and record.k == 1
        assert [c.zone for c in run.app_deletes()] in (["2"], ["3"])


@pytest.mark.parametrize("mode", MODES)
def test_0_2_4_with_max_surge_2_moves_two_vms_in_one_operation(store, mode):
    with running_stack(web(mode, {"1": 0, "2": 2, "3": 4}), store, max_surge="2") as stack:
        run = Drive(stack)
        run.until_settled()
        after = stack.sim.scale_set("rg-web", "web")
        assert after.zone_counts() == {"1": 2, "2": 2, "3": 2}
        assert after.capacity == 6
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        assert (record.k, record.target_capacity, len(record.kept)) == (2, 8, 2)
        assert sorted(c.zone for c in run.app_deletes()) == ["3", "3"]


@pytest.mark.parametrize("mode", MODES)
def test_2_4_7_with_deallocated_vms_ends_at_4_4_5(store, mode):
    deallocated = (VmOverride(zone="3", count=2, power_state="deallocated"),)
    scenario = web(mode, {"1": 2, "2": 4, "3": 7}, overrides=deallocated)
    with running_stack(scenario, store) as stack:
        run = Drive(stack)
        run.until_settled()
        after = stack.sim.scale_set("rg-web", "web")
        assert after.zone_counts() == {"1": 4, "2": 4, "3": 5}
        assert after.capacity == 13
        assert run.states() == [State.SUCCEEDED, State.SUCCEEDED]
        assert sum(1 for vm in after.vms if vm.power_state == "deallocated") == 2  # kept
        assert all(c.health == "healthy" for c in run.app_deletes())  # active sources only


@pytest.mark.parametrize("mode", MODES)
def test_a_zone_without_capacity_is_rolled_back_backed_off_and_retried(store, mode):
    scenario = Scenario(
        scale_sets=web(mode, {"1": 1, "2": 3, "3": 3}).scale_sets,
        capacity=(ZoneCapacity("westeurope", "Standard_D2s_v5", "1", 0),),
    )
    with running_stack(scenario, store) as stack:
        run = Drive(stack)
        run.until_terminal()
        (first,) = run.records()
        assert first.state is State.ROLLED_BACK
        assert first.history[-2].reason is Reason.NO_CAPACITY_IN_TARGET_ZONE
        assert stack.sim.scale_set("rg-web", "web").zone_counts() == {"1": 1, "2": 3, "3": 3}
        now = stack.sim.clock.now()
        until = store.backoff_until("westeurope", "Standard_D2s_v5", "1", now)
        assert until is not None

        # While backed off: no new operation, and the verdict says why.
        result = run.reconciler.reconcile(run.ref())
        assert result.outcome is Outcome.ASSESSED and result.verdict.reason == "zone_backoff"

        # After the backoff it is tried again; still no room: rolled back, backed off longer.
        stack.sim.advance((until - now).total_seconds() + 1)
        run.until(lambda: len(run.records()) == 2 and run.idle(), what="a second attempt")
        assert run.states() == [State.ROLLED_BACK, State.ROLLED_BACK]
        now = stack.sim.clock.now()
        second = store.backoff_until("westeurope", "Standard_D2s_v5", "1", now)
        assert second is not None and second - now > until - first.updated_at

        # Capacity returns; once the backoff ends the move succeeds.
        stack.sim.actor.set_zone_room("westeurope", "Standard_D2s_v5", "1", None)
        stack.sim.advance((second - now).total_seconds() + 1)
        run.until_settled()
        assert run.states()[-1] is State.SUCCEEDED
        assert sorted(stack.sim.scale_set("rg-web", "web").zone_counts().values()) == [2, 2, 3]
        assert (
            store.backoff_until("westeurope", "Standard_D2s_v5", "1", stack.sim.clock.now()) is None
        )


@pytest.mark.parametrize("mode", MODES)
def test_a_new_vm_that_never_gets_healthy_is_deleted_when_the_source_is_healthy(store, mode):
    scenario = web(mode, {"1": 1, "2": 3, "3": 3}, new_vm_health="unhealthy")
    with running_stack(scenario, store, health_timeout_minutes="10") as stack:
        before = ids(stack.sim.scale_set("rg-web", "web"))
        run = Drive(stack, step=60)
        run.until_terminal()
        (record,) = run.records()
        assert record.state is State.ROLLED_BACK
        assert Reason.HEALTH_TIMEOUT in [t.reason for t in record.history]
        after = stack.sim.scale_set("rg-web", "web")
        assert ids(after) == before  # the new VM went, every original VM stayed
        assert after.capacity == 7
        assert [c.instance_id for c in run.app_deletes()] == own_new_vms(stack.sim, record)


@pytest.mark.parametrize("mode", MODES)
def test_a_new_vm_that_never_gets_healthy_replaces_an_unhealthy_source(store, mode):
    unhealthy = (VmOverride(zone="3", count=3, health="unhealthy"),)
    scenario = web(mode, {"1": 1, "2": 3, "3": 4}, new_vm_health="unhealthy", overrides=unhealthy)
    with running_stack(scenario, store, health_timeout_minutes="10") as stack:
        run = Drive(stack, step=60)
        run.until_terminal()
        record = run.records()[0]
        assert record.state is State.SUCCEEDED
        assert Reason.HEALTH_TIMEOUT in [t.reason for t in record.history]
        (deleted,) = run.app_deletes()
        assert deleted.zone == "3" and deleted.health == "unhealthy"
        kept = stack.sim.scale_set("rg-web", "web").vm(record.kept[0])
        assert kept.zone == "1" and kept.health == "unhealthy"


@pytest.mark.parametrize("mode", MODES)
def test_protected_vms_in_the_over_provisioned_zone_are_never_chosen(store, mode):
    # Zone 3 has one unprotected VM: it moves, then the rest of zone 3 is protected and the
    # plan stops short of balance, saying why.
    protected = (VmOverride(zone="3", count=5, protect_from_scale_in=True),)
    scenario = web(mode, {"1": 0, "2": 2, "3": 6}, overrides=protected)
    with running_stack(scenario, store) as stack:
        view = stack.sim.scale_set("rg-web", "web")
        guarded = {vm.instance_id for vm in view.vms if vm.protect_from_scale_in}
        assert len(guarded) == 5
        run = Drive(stack)
        run.until(lambda: run.idle() and len(run.records()) == 1, what="one move")
        for _ in range(4):
            run.tick()
        run.check("at the end", settled=True)
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        after = stack.sim.scale_set("rg-web", "web")
        assert guarded <= ids(after)
        assert after.zone_counts() == {"1": 1, "2": 2, "3": 5}
        assert [c.protected for c in run.app_deletes()] == [False]
        assert run.results[-1].verdict.reason == "no_eligible_source"


def test_a_set_whose_only_sources_are_protected_is_left_alone(store):
    protected = (VmOverride(zone="3", count=4, protect_from_scale_in=True),)
    with running_stack(web("Uniform", {"1": 1, "2": 2, "3": 4}, overrides=protected), store) as st:
        run = Drive(st)
        for _ in range(3):
            (result,) = run.tick()
            assert result.outcome is Outcome.ASSESSED
            assert result.verdict.reason == "no_eligible_source"
        assert run.records() == []
        assert not [r for r in st.sim.requests if r.method != "GET"]


@pytest.mark.parametrize("mode", MODES)
def test_autoscale_scaling_out_mid_operation_supersedes_it_and_deletes_nothing(store, mode):
    with running_stack(web(mode, {"1": 1, "2": 3, "3": 3}), store) as stack:
        run = Drive(stack)
        run.until(lambda: run.records()[-1].state is State.AWAITING_HEALTH if run.records() else 0)
        stack.sim.actor.set_capacity("rg-web", "web", 12)
        stack.sim.advance(5)
        run.until(run.idle, what="the operation ends")
        (record,) = run.records()
        assert record.state is State.SUPERSEDED and record.outcome is Reason.CAPACITY_CHANGED
        for _ in range(6):  # and nothing happens afterwards either: the next audit re-plans
            run.tick()
        assert run.app_deletes() == []
        assert stack.sim.scale_set("rg-web", "web").capacity == 12
        run.check("at the end", settled=True)


@pytest.mark.parametrize("mode", MODES)
def test_someone_deleting_the_new_vm_mid_operation_ends_it_without_deletes(store, mode):
    with running_stack(web(mode, {"1": 1, "2": 3, "3": 3}), store) as stack:
        run = Drive(stack)
        run.until(lambda: run.records()[-1].state is State.AWAITING_HEALTH if run.records() else 0)
        (new_vm,) = run.records()[-1].kept
        stack.sim.actor.delete_instances("rg-web", "web", [new_vm])
        stack.sim.advance(5)
        run.until(run.idle, what="the operation ends")
        (record,) = run.records()
        assert record.state is State.SUPERSEDED
        assert record.outcome in (Reason.NEW_VM_REMOVED, Reason.CAPACITY_CHANGED)
        assert run.app_deletes() == []
        assert new_vm not in ids(stack.sim.scale_set("rg-web", "web"))


@pytest.mark.parametrize("mode", MODES)
def test_the_scale_set_deleted_mid_operation_ends_it(store, mode):
    with running_stack(web(mode, {"1": 1, "2": 3, "3": 3}), store) as stack:
        run = Drive(stack)
        run.until(lambda: run.records()[-1].state is State.AWAITING_HEALTH if run.records() else 0)
        stack.sim.actor.delete_scale_set("rg-web", "web")
        run.until(run.idle, what="the operation ends")
        (record,) = run.records()
        assert record.state is State.SUPERSEDED and record.outcome is Reason.SCALE_SET_DELETED
        stack.sim.advance(600)
        (result,) = run.tick()
        assert result.outcome is Outcome.GONE
        assert run.app_deletes() == []
        run.check("at the end", settled=True)


@pytest.mark.parametrize("mode", MODES)
def test_quota_too_low_starts_nothing_and_records_why(store, mode):
    # 7 VMs of 2 vCPUs use 14; one more would need 16.
    quota = (QuotaSpec("westeurope", "standardDSv5Family", 15),)
    with running_stack(web(mode, {"1": 1, "2": 3, "3": 3}, quotas=quota), store) as stack:
        run = Drive(stack)
        for _ in range(3):
            (result,) = run.tick()
            assert result.outcome is Outcome.ASSESSED
            assert result.verdict.reason == "quota"
            assert "raise the quota" in result.detail
        assert run.records() == []
        saved = store.last_assessment(run.ref().key)
        assert saved is not None and '"reason": "quota"' in saved.body
        assert not [r for r in stack.sim.requests if r.method != "GET"]


def test_min_move_interval_spaces_out_operations(store):
    scenario = web("Uniform", {"1": 2, "2": 4, "3": 7})
    with running_stack(scenario, store, min_move_interval_minutes="30") as stack:
        run = Drive(stack, step=60)
        run.until_settled(ticks=200)
        first, second = run.records()
        assert second.created_at - first.updated_at >= timedelta(minutes=30)


# The checker itself: each rule fails when broken (so a green suite means something).


def test_the_invariants_catch_an_unexplained_delete_of_a_protected_vm(store):
    protected = (VmOverride(instance="5", protect_from_scale_in=True),)
    with running_stack(web("Uniform", {"1": 1, "2": 3, "3": 3}, overrides=protected), store) as st:
        run = Drive(st)
        run.check("before")
        client = st.sim.compute_client()  # the app's identity, around the adapter's checks
        client.virtual_machine_scale_sets.begin_delete_instances(
            "rg-web", "web", {"instanceIds": ["5"]}, polling=False
        )
        with pytest.raises(AssertionError) as caught:
            run.check()
        assert "[2] " in str(caught.value) and "no operation record asked for it" in str(
            caught.value
        )


def test_the_invariants_catch_a_source_deleted_before_its_replacement_is_healthy(store):
    with running_stack(web("Uniform", {"1": 1, "2": 3, "3": 3}), store) as st:
        run = Drive(st)
        run.tick()  # an operation is scaling out; its new VM is not healthy yet
        client = st.sim.compute_client()
        client.virtual_machine_scale_sets.begin_delete_instances(
            "rg-web", "web", {"instanceIds": ["6"]}, polling=False
        )
        with pytest.raises(AssertionError) as caught:
            run.check()
        text = str(caught.value)
        assert "[1] " in text and "no operation record asked for it" in text
        assert "[5] " in text and "from 7 to 6, below operation" in text


def test_a_vm_turning_unhealthy_mid_move_is_not_the_apps_loss(store):
    """Rule 5 counts healthy VMs; one that turns unhealthy by itself during a move lowers what
    the owners keep, as one they delete does. The app still deletes its source once the new VM
    is healthy (a net zero for the app), and the checker takes that as it is."""
    with running_stack(web("Uniform", {"1": 1, "2": 3, "3": 3}), store) as st:
        run = Drive(st)
        run.tick()  # scaling out
        st.sim.actor.set_health("rg-web", "web", "0", "unhealthy")  # zone 1: never a source
        run.until_terminal()
        run.check("after the move")
        (record,) = run.records()
        assert record.state is State.SUCCEEDED and record.sources
        assert len(run.app_deletes()) == len(record.sources)


def test_the_invariants_catch_an_untracked_scale_out_and_a_write_out_of_scope(store):
    scenario = Scenario(
        scale_sets=(
            *web("Uniform", {"1": 1, "2": 3, "3": 3}).scale_sets,
            ScaleSetSpec("db", "rg-web", counts={"1": 1, "2": 1, "3": 1}),
        )
    )
    with running_stack(scenario, store) as st:
        run = Drive(st)
        st.compute.set_capacity(run.ref(), 8)
        st.compute.set_capacity(ScaleSetRef.parse(st.sim.scale_set("rg-web", "db").id), 4)
        with pytest.raises(AssertionError) as caught:
            run.check(settled=True)
        text = str(caught.value)
        assert "[3] VM 7 of web: created by the app, in no operation record" in text
        assert "PATCH of web outside any operation" in text
        assert "[6] PATCH" in text and "/db" in text


def test_the_invariants_catch_a_second_scale_out_of_one_operation(store):
    with running_stack(web("Uniform", {"1": 1, "2": 3, "3": 3}), store) as st:
        run = Drive(st)
        run.tick()
        (record,) = run.records()
        st.compute.set_capacity(run.ref(), record.target_capacity)
        with pytest.raises(AssertionError, match="PATCHed capacity 2 times"):
            run.check()
        run.check(single_scale_out=False)


@pytest.mark.parametrize("free", ["1", "3", "5"])
@pytest.mark.parametrize("mode", MODES)
def test_only_the_one_unprotected_vm_of_the_full_zones_is_moved(store, mode, free):
    # Every VM of zones 2 and 3 but one is protected. Once the new VM has landed the set looks
    # balanced (2/3/3), so the source is chosen from a picture with no plan in it: protection
    # must still be known for whatever is chosen (Flexible VMs show it only in a per-VM GET).
    # `free` is a Uniform instance id or a Flexible VM's position; Flexible names are random,
    # so several positions make sure the free VM is not always the one chosen first anyway.
    positions = [p for p in ("1", "2", "3", "4", "5", "6") if p != free]
    protected = tuple(VmOverride(instance=p, protect_from_scale_in=True) for p in positions)
    with running_stack(web(mode, {"1": 1, "2": 3, "3": 3}, overrides=protected), store) as st:
        view = st.sim.scale_set("rg-web", "web")
        guarded = {vm.instance_id for vm in view.vms if vm.protect_from_scale_in}
        assert len(guarded) == 5
        run = Drive(st)
        run.until_settled()
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        assert guarded <= ids(st.sim.scale_set("rg-web", "web"))
        assert [c.protected for c in run.app_deletes()] == [False]


@pytest.mark.parametrize("mode", MODES)
def test_a_new_vm_protected_by_its_owner_meanwhile_is_not_deleted(store, mode):
    # The new VM never gets healthy while its source is healthy, so it would be deleted at the
    # health deadline; but someone protected it meanwhile: their decision wins.
    scenario = web(mode, {"1": 1, "2": 3, "3": 3}, new_vm_health="unhealthy")
    with running_stack(scenario, store, health_timeout_minutes="10") as stack:
        run = Drive(stack, step=60)
        run.until(lambda: bool(run.records()) and bool(run.records()[-1].kept), what="placed")
        (new_vm,) = run.records()[-1].kept
        stack.sim.actor.protect("rg-web", "web", new_vm)
        stack.sim.advance(5)
        run.until(run.idle, what="the operation ends")
        assert new_vm in ids(stack.sim.scale_set("rg-web", "web"))
        assert run.app_deletes() == []
        run.check("at the end", settled=True)


@pytest.mark.parametrize("mode", MODES)
def test_one_spurious_404_on_the_scale_set_does_not_end_the_operation(store, mode):
    # ARM can answer one GET with 404 for a scale set that exists. Ending the operation as
    # "scale set deleted" would leave its new VM untracked; it must be confirmed first.
    with running_stack(web(mode, {"1": 1, "2": 3, "3": 3}), store) as stack:
        run = Drive(stack)
        run.until(lambda: bool(run.records()) and bool(run.records()[-1].kept), what="placed")
        fault = stack.sim.faults.add(kind="not_found", operation="vmss.get", count=1)
        run.until_settled()
        assert stack.sim.faults.fired(fault) == 1
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        assert sorted(stack.sim.scale_set("rg-web", "web").zone_counts().values()) == [2, 2, 3]


@pytest.mark.parametrize("mode", MODES)
def test_opting_out_mid_operation_removes_only_the_new_vm(store, mode):
    with running_stack(web(mode, {"1": 1, "2": 3, "3": 3}), store) as stack:
        before = ids(stack.sim.scale_set("rg-web", "web"))
        run = Drive(stack)
        run.until(lambda: bool(run.records()) and bool(run.records()[-1].kept), what="placed")
        stack.sim.actor.set_tags("rg-web", "web", {"zone-rebalance": "disabled"})
        stack.sim.advance(10)
        run.until(run.idle, what="the operation ends")
        (record,) = run.records()
        assert record.state is State.ROLLED_BACK
        assert Reason.STAND_DOWN in [t.reason for t in record.history]
        assert {c.instance_id for c in run.app_deletes()} == set(own_new_vms(stack.sim, record))
        after = stack.sim.scale_set("rg-web", "web")
        assert ids(after) == before and after.capacity == 7
        for _ in range(3):  # and, opted out, nothing starts again
            run.tick()
        assert len(run.records()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_terminate_notification_delays_the_delete_and_the_operation_waits_for_it(store, mode):
    scenario = web(mode, {"1": 1, "2": 3, "3": 3}, terminate_notification_seconds=900)
    with running_stack(scenario, store) as stack:
        run = Drive(stack, step=60)
        run.until_settled(ticks=60)
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        deleting = next(t for t in record.history if t.reason is Reason.DELETE_REQUESTED)
        assert record.updated_at - deleting.at >= timedelta(minutes=15)
