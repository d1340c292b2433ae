"""The operations scenarios end to end, driven only through the Azure Functions entry points.

armsim's Event Grid events reach the real decorated Event Grid function (decoded by the
azure.functions converter from the exact payload armsim emits), delivered at least once,
sometimes twice and out of order; timer ticks reach the real timer function; Azurite holds
the state. After every tick the never-rules are checked, and every write the app sent to
armsim must be one operation step's, sent once (devkit/driver.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from armsim import QuotaSpec, ScaleSetSpec, Scenario, Timings, VmOverride, ZoneCapacity
from chaos.netcut import NetCut
from devkit.azurite import connection_string
from devkit.driver import FunctionsDriver
from devkit.invariants import own_new_vms
from devkit.stack import running_stack
from devkit.tables import forget_event
from rebalancer import service
from rebalancer.events import OBJECT_ID_CLAIM
from rebalancer.model import ScaleSetRef
from rebalancer.operation import Reason, State
from rebalancer.store import StorageConnection, Store

ENABLED = {"zone-rebalance": "enabled"}
MODES = ["Uniform", "Flexible"]
SLOW_HEALTH = Timings(health=900)
"""New VMs report health 15 minutes after provisioning, so an operation rests in
`awaiting_health` for a few ticks: the moment the mid-operation scenarios interfere."""


@pytest.fixture(autouse=True)
def _reset_runtime() -> Iterator[None]:
    service.forget_app_settings()
    yield
    service.forget_app_settings()


def web(mode: str, counts: dict[str, int], **options) -> Scenario:
    extra = {k: options.pop(k) for k in ("capacity", "quotas", "timings") if k in options}
    spec = ScaleSetSpec("web", "rg-web", mode=mode, counts=counts, tags=ENABLED, **options)
    return Scenario(scale_sets=(spec,), **extra)


def ids(view) -> set[str]:
    return {vm.instance_id for vm in view.vms}


@pytest.mark.parametrize("mode", MODES)
def test_1_3_3_is_balanced_by_one_move(store, mode):
    with (
        running_stack(web(mode, {"1": 1, "2": 3, "3": 3}), store) as stack,
        FunctionsDriver(stack, seed=1) as run,
    ):
        before = ids(stack.sim.scale_set("rg-web", "web"))
        run.until_settled()
        after = stack.sim.scale_set("rg-web", "web")
        assert sorted(after.zone_counts().values()) == [2, 2, 3]
        assert after.capacity == 7 and len(before - ids(after)) == 1
        (record,) = run.records()
        assert record.state is State.SUCCEEDED and record.k == 1
        assert len(run.app_writes()) == 2  # one scale-out, one delete
        assert run.duplicates_delivered() > 0
        # The app's own writes came back as events, and did not count as outside activity.
        app = stack.sim.scenario.app_principal_id
        assert [p["data"]["claims"][OBJECT_ID_CLAIM] for p in run.received] == [app, app]
        assert store.last_activity(run.ids[("rg-web", "web")].lower()) is None


@pytest.mark.parametrize("mode", MODES)
def test_0_2_4_with_max_surge_2_moves_two_vms_in_one_operation(store, mode):
    scenario = web(mode, {"1": 0, "2": 2, "3": 4})
    with (
        running_stack(scenario, store, max_surge="2") as stack,
        FunctionsDriver(stack, seed=2) as run,
    ):
        run.until_settled()
        after = stack.sim.scale_set("rg-web", "web")
        assert after.zone_counts() == {"1": 2, "2": 2, "3": 2} and after.capacity == 6
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        assert (record.k, record.target_capacity, len(record.kept)) == (2, 8, 2)
        assert sorted(c.zone for c in run.app_deletes()) == ["3", "3"]
        assert [w.operation for w in run.app_writes()] == ["vmss.update", "vmss.delete_instances"]


@pytest.mark.parametrize("mode", MODES)
def test_2_4_7_with_deallocated_vms_ends_at_4_4_5(store, mode):
    deallocated = (VmOverride(zone="3", count=2, power_state="deallocated"),)
    scenario = web(mode, {"1": 2, "2": 4, "3": 7}, overrides=deallocated)
    with (
        running_stack(scenario, store, audit_interval_minutes="15") as stack,
        FunctionsDriver(stack, seed=3, step=60) as run,
    ):
        # One move per operation: the second starts at the audit after the first ends.
        run.until_settled()
        after = stack.sim.scale_set("rg-web", "web")
        assert after.zone_counts() == {"1": 4, "2": 4, "3": 5} and after.capacity == 13
        assert run.states() == [State.SUCCEEDED, State.SUCCEEDED]
        assert sum(1 for vm in after.vms if vm.power_state == "deallocated") == 2
        assert all(c.health == "healthy" for c in run.app_deletes())  # active sources only


@pytest.mark.parametrize("mode", MODES)
def test_a_zone_without_capacity_is_rolled_back_backed_off_and_retried(store, mode):
    scenario = Scenario(
        scale_sets=web(mode, {"1": 1, "2": 3, "3": 3}).scale_sets,
        capacity=(ZoneCapacity("westeurope", "Standard_D2s_v5", "1", 0),),
    )
    with (
        running_stack(scenario, store, audit_interval_minutes="10") as stack,
        FunctionsDriver(stack, seed=4, step=120) as run,
    ):
        first = run.until_state(State.ROLLED_BACK)
        assert Reason.NO_CAPACITY_IN_TARGET_ZONE in [t.reason for t in first.history]
        assert stack.sim.scale_set("rg-web", "web").zone_counts() == {"1": 1, "2": 3, "3": 3}
        until = store.backoff_until("westeurope", "Standard_D2s_v5", "1", stack.sim.clock.now())
        assert until is not None

        # Backed off: the audits in between report why, and start nothing.
        run.until(lambda: '"reason": "zone_backoff"' in assessment(store, run), ticks=20)
        run.until(lambda: len(run.records()) == 2, what="a second attempt")
        second = run.records()[-1]
        assert second.created_at >= until  # not before the backoff ended
        run.until_state(State.ROLLED_BACK)
        later = store.backoff_until("westeurope", "Standard_D2s_v5", "1", stack.sim.clock.now())
        assert later is not None and later - second.updated_at > until - first.updated_at

        # Capacity returns: once the longer backoff ends the move succeeds.
        stack.sim.actor.set_zone_room("westeurope", "Standard_D2s_v5", "1", None)
        run.until_settled()
        assert run.states()[-1] is State.SUCCEEDED and run.records()[-1].created_at >= later
        assert sorted(stack.sim.scale_set("rg-web", "web").zone_counts().values()) == [2, 2, 3]
        assert store.backoff_until("westeurope", "Standard_D2s_v5", "1", later) is None


def assessment(
    store, run: FunctionsDriver, name: str = "web", resource_group: str = "rg-web"
) -> str:
    """The verdict the app last recorded for the scale set (JSON), or ''."""
    saved = store.last_assessment(run.ids[(resource_group, name)].lower())
    return saved.body if saved is not None else ""


@pytest.mark.parametrize("mode", MODES)
def test_a_new_vm_that_never_gets_healthy_is_deleted_when_the_source_is_healthy(store, mode):
    scenario = web(mode, {"1": 1, "2": 3, "3": 3}, new_vm_health="unhealthy")
    with (
        running_stack(scenario, store, health_timeout_minutes="10") as stack,
        FunctionsDriver(stack, seed=5, step=60) as run,
    ):
        before = ids(stack.sim.scale_set("rg-web", "web"))
        record = run.until_state(State.ROLLED_BACK)
        assert Reason.HEALTH_TIMEOUT in [t.reason for t in record.history]
        after = stack.sim.scale_set("rg-web", "web")
        assert ids(after) == before and after.capacity == 7  # the new VM went, no source did
        assert [c.instance_id for c in run.app_deletes()] == own_new_vms(stack.sim, record)
        run.check("after the rollback")


@pytest.mark.parametrize("mode", MODES)
def test_a_new_vm_that_never_gets_healthy_replaces_an_unhealthy_source(store, mode):
    unhealthy = (VmOverride(zone="3", count=3, health="unhealthy"),)
    scenario = web(mode, {"1": 1, "2": 3, "3": 4}, new_vm_health="unhealthy", overrides=unhealthy)
    with (
        running_stack(scenario, store, health_timeout_minutes="10") as stack,
        FunctionsDriver(stack, seed=6, step=60) as run,
    ):
        record = run.until_state(State.SUCCEEDED)
        assert Reason.HEALTH_TIMEOUT in [t.reason for t in record.history]
        (deleted,) = run.app_deletes()
        assert deleted.zone == "3" and deleted.health == "unhealthy"
        kept = stack.sim.scale_set("rg-web", "web").vm(record.kept[0])
        assert kept.zone == "1" and kept.health == "unhealthy"


@pytest.mark.parametrize("mode", MODES)
def test_protected_vms_in_the_over_provisioned_zone_are_never_deleted(store, mode):
    protected = (VmOverride(zone="3", count=5, protect_from_scale_in=True),)
    scenario = web(mode, {"1": 0, "2": 2, "3": 6}, overrides=protected)
    with (
        running_stack(scenario, store, audit_interval_minutes="10") as stack,
        FunctionsDriver(stack, seed=7) as run,
    ):
        view = stack.sim.scale_set("rg-web", "web")
        guarded = {vm.instance_id for vm in view.vms if vm.protect_from_scale_in}
        run.until_state(State.SUCCEEDED)
        run.until(lambda: '"reason": "no_eligible_source"' in assessment(store, run), ticks=60)
        for _ in range(10):
            run.tick()
        run.check("at the end", settled=True)
        assert run.states() == [State.SUCCEEDED]
        after = stack.sim.scale_set("rg-web", "web")
        assert guarded <= ids(after)
        assert after.zone_counts() == {"1": 1, "2": 2, "3": 5}
        assert [c.protected for c in run.app_deletes()] == [False]


@pytest.mark.parametrize("mode", MODES)
def test_protecting_every_candidate_source_mid_operation_deletes_none_of_them(store, mode):
    with (
        running_stack(web(mode, {"1": 1, "2": 3, "3": 3}, timings=SLOW_HEALTH), store) as stack,
        FunctionsDriver(stack, seed=17) as run,
    ):
        record = run.until_state(State.AWAITING_HEALTH)
        view = stack.sim.scale_set("rg-web", "web")
        guarded = {vm.instance_id for vm in view.vms if vm.zone in ("2", "3")}
        for vm in sorted(guarded):
            stack.sim.actor.protect("rg-web", "web", vm)  # a VM write event each
        record = run.until_state(State.ROLLED_BACK, ticks=60)
        assert Reason.NOTHING_TO_KEEP in [t.reason for t in record.history]
        run.check("at the end", settled=True)
        assert guarded <= ids(stack.sim.scale_set("rg-web", "web"))
        assert [c.instance_id for c in run.app_deletes()] == own_new_vms(stack.sim, record)
        assert not [c for c in run.app_deletes() if c.protected]


@pytest.mark.parametrize("mode", MODES)
def test_autoscale_scaling_out_mid_operation_supersedes_it_and_deletes_nothing(store, mode):
    with (
        running_stack(web(mode, {"1": 1, "2": 3, "3": 3}, timings=SLOW_HEALTH), store) as stack,
        FunctionsDriver(stack, seed=8) as run,
    ):
        run.until_state(State.AWAITING_HEALTH)
        stack.sim.actor.set_capacity("rg-web", "web", 12)
        with run.events_only():
            record = run.until_state(State.SUPERSEDED, ticks=20)
        assert record.outcome in (Reason.CAPACITY_CHANGED, Reason.UNEXPECTED_INSTANCES)
        with run.events_only():  # the host is down for 6 minutes: a timer tick is missed
            for _ in range(12):
                run.tick()
        run.tick()  # the first tick after it is past due
        assert run.past_due_calls == 1
        key = run.ids[("rg-web", "web")].lower()
        assert store.last_activity(key) is not None  # the scale-out starts the cooldown
        for _ in range(20):
            run.tick()
        run.check("at the end", settled=True)
        assert len(run.records()) == 1 and run.app_deletes() == []
        assert stack.sim.scale_set("rg-web", "web").capacity == 12


@pytest.mark.parametrize("mode", MODES)
def test_someone_deleting_the_new_vm_mid_operation_ends_it_without_deletes(store, mode):
    with (
        running_stack(web(mode, {"1": 1, "2": 3, "3": 3}, timings=SLOW_HEALTH), store) as stack,
        FunctionsDriver(stack, seed=9) as run,
    ):
        (new_vm,) = run.until_state(State.AWAITING_HEALTH).kept
        stack.sim.actor.delete_vm("rg-web", "web", new_vm)
        with run.events_only():
            record = run.until_state(State.SUPERSEDED, ticks=20)
        assert record.outcome in (Reason.NEW_VM_REMOVED, Reason.CAPACITY_CHANGED)
        for _ in range(10):
            run.tick()
        run.check("at the end", settled=True)
        assert run.app_deletes() == []
        assert new_vm not in ids(stack.sim.scale_set("rg-web", "web"))


@pytest.mark.parametrize("mode", MODES)
def test_the_scale_set_deleted_mid_operation_ends_it(store, mode):
    with (
        running_stack(web(mode, {"1": 1, "2": 3, "3": 3}, timings=SLOW_HEALTH), store) as stack,
        FunctionsDriver(stack, seed=10) as run,
    ):
        run.until_state(State.AWAITING_HEALTH)
        stack.sim.actor.delete_scale_set("rg-web", "web")
        with run.events_only():
            record = run.until_state(State.SUPERSEDED, ticks=20)
        assert record.outcome is Reason.SCALE_SET_DELETED
        for _ in range(10):
            run.tick()
        run.check("at the end", settled=True)
        assert run.app_deletes() == [] and len(run.records()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_quota_too_low_starts_nothing_and_records_why(store, mode):
    quota = (QuotaSpec("westeurope", "standardDSv5Family", 15),)  # 7 VMs use 14 of 15 vCPUs
    scenario = web(mode, {"1": 1, "2": 3, "3": 3}, quotas=quota)
    with (
        running_stack(scenario, store, cooldown_minutes="0") as stack,
        FunctionsDriver(stack, seed=11) as run,
    ):
        stack.sim.actor.set_tags("rg-web", "web", {**ENABLED, "team": "web"})  # an event
        for _ in range(6):
            run.tick()
        run.flush()
        assert any(
            d.operation_name.endswith("virtualMachineScaleSets/write") for d in run.deliveries
        )
        assert run.records() == []
        saved = assessment(store, run)
        assert '"reason": "quota"' in saved and "raise the quota" in saved
        assert not [
            r
            for r in stack.sim.requests
            if r.method != "GET" and r.principal_id == stack.sim.scenario.app_principal_id
        ]


@pytest.mark.parametrize("mode", MODES)
def test_opting_out_by_tag_mid_operation_removes_only_the_new_vm(store, mode):
    with (
        running_stack(web(mode, {"1": 1, "2": 3, "3": 3}, timings=SLOW_HEALTH), store) as stack,
        FunctionsDriver(stack, seed=12) as run,
    ):
        before = ids(stack.sim.scale_set("rg-web", "web"))
        record = run.until_state(State.AWAITING_HEALTH)
        stack.sim.actor.set_tags("rg-web", "web", {"zone-rebalance": "disabled"})
        with run.events_only():
            record = run.until_state(State.ROLLED_BACK, ticks=30)
        assert Reason.STAND_DOWN in [t.reason for t in record.history]
        for _ in range(10):
            run.tick()
        run.check("at the end", settled=True)
        after = stack.sim.scale_set("rg-web", "web")
        assert ids(after) == before and after.capacity == 7
        assert [c.instance_id for c in run.app_deletes()] == own_new_vms(stack.sim, record)
        assert len(run.records()) == 1


def test_an_event_for_a_scale_set_outside_the_resource_groups_changes_nothing(store, caplog):
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec("outside", "rg-other", counts={"1": 0, "2": 3, "3": 3}, tags=ENABLED),
            ScaleSetSpec("web", "rg-web", counts={"1": 2, "2": 2, "3": 2}, tags=ENABLED),
        )
    )
    env = {"resource_groups": "rg-web", "cooldown_minutes": "0"}
    with (
        running_stack(scenario, store, **env) as stack,
        FunctionsDriver(stack, seed=13, writable=("web",)) as run,
        caplog.at_level(logging.INFO, logger="rebalancer"),
    ):
        stack.sim.actor.set_capacity("rg-other", "outside", 7)
        victim = stack.sim.scale_set("rg-other", "outside").vms[0].instance_id
        stack.sim.actor.delete_vm("rg-other", "outside", victim)
        for _ in range(15):
            run.tick()
        run.flush()
        run.check("at the end", settled=True)
        outside = [p for p in run.received if "/resourcegroups/rg-other/" in p["subject"].lower()]
        assert len(outside) >= 2  # the scale-out and the VM delete reached the function
        for payload in outside:
            assert f"event {payload['id']} ignored: resource group 'rg-other' is outside" in (
                caplog.text
            )
        assert run.records("outside", "rg-other") == []
        assert assessment(store, run, "outside", "rg-other") == ""
        app = stack.sim.scenario.app_principal_id
        touched = [r for r in stack.sim.requests if r.principal_id == app and "rg-other" in r.path]
        assert touched == []  # not even read
        assert stack.sim.scale_set("rg-other", "outside").capacity == 6


def test_duplicated_and_reordered_events_cause_no_second_action(store):
    """Two scale sets move at once while someone edits their tags: their events interleave,
    every one is delivered twice, many late; each write still happens once per step."""
    scenario = Scenario(
        scale_sets=tuple(
            ScaleSetSpec(name, "rg-web", mode=mode, counts={"1": 0, "2": 2, "3": 4}, tags=ENABLED)
            for name, mode in (("web", "Uniform"), ("api", "Flexible"))
        )
    )
    env = {"audit_interval_minutes": "10", "cooldown_minutes": "0"}
    with (
        running_stack(scenario, store, **env) as stack,
        FunctionsDriver(stack, seed=14, duplicate=1.0, hold_back=0.5) as run,
    ):
        run.tick()
        for name in ("web", "api"):
            stack.sim.actor.set_tags("rg-web", name, {**ENABLED, "owner": "team-a"})
        run.until_settled(("web", "api"))
        records = {name: run.records(name) for name in ("web", "api")}
        writes = {name: [(w.operation, w.body) for w in run.app_writes(name)] for name in records}
        for name in records:
            assert [r.state for r in records[name]] == [State.SUCCEEDED, State.SUCCEEDED]
            assert [op for op, _ in writes[name]] == ["vmss.update", "vmss.delete_instances"] * 2
        assert run.duplicates_delivered() == len(run.received) >= 10
        first_seen = list(dict.fromkeys(d.event_id for d in run.deliveries))
        assert first_seen != [p["id"] for p in run.received]  # some arrived out of order

        # Event Grid delivers every event once more, late and newest first: duplicates.
        emitted = list(run.received)
        run.redeliver(reversed(emitted))
        run.until(lambda: not run.pending(), ticks=20, what="every event delivered")
        # Once the de-duplication marks have expired, the events are new again: the app
        # reconciles each scale set anew and finds nothing to do.
        for payload in emitted:
            forget_event(store, payload["id"])
        run.redeliver(reversed(emitted))
        run.until(lambda: not run.pending(), ticks=20, what="every event delivered")
        assert run.received == emitted  # nothing new happened
        acknowledged = Counter(d.event_id for d in run.deliveries if not d.retried)
        assert min(acknowledged[p["id"]] for p in emitted) >= 6  # each one, twice, three times
        run.check("at the end", settled=True)
        for name in records:
            assert [(w.operation, w.body) for w in run.app_writes(name)] == writes[name]
            assert run.records(name) == records[name]


def test_concurrent_invocations_of_both_functions_act_once(store):
    """Every tick the timer and each event (twice) run at the same moment on threads, as
    one instance with concurrent invocations runs them: the lock and the operation record
    still let each step happen once."""
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),
            ScaleSetSpec(
                "api", "rg-web", mode="Flexible", counts={"1": 0, "2": 2, "3": 4}, tags=ENABLED
            ),
        )
    )
    env = {"audit_interval_minutes": "5", "max_surge": "2"}
    with (
        running_stack(scenario, store, **env) as stack,
        FunctionsDriver(stack, seed=18, duplicate=1.0, timer_every=30, parallel=True) as run,
    ):
        run.until_settled(("web", "api"))
        assert run.states("web") == run.states("api") == [State.SUCCEEDED]
        for name in ("web", "api"):
            assert [w.operation for w in run.app_writes(name)] == [
                "vmss.update",
                "vmss.delete_instances",
            ]
        assert stack.sim.scale_set("rg-web", "api").zone_counts() == {"1": 2, "2": 2, "3": 2}


@contextmanager
def app_behind_a_relay(store, azurite, table_prefix) -> Iterator[tuple[FunctionsDriver, NetCut]]:
    """1/3/3 with the app's Table Storage client going through a relay an outage cuts (the
    checks read the tables directly). The first tick starts the move; then the scale-out's
    write event is queued, not delivered."""
    relay = NetCut(azurite.port or 0)
    app_store = Store(
        StorageConnection("test", connection_string=connection_string(relay.port)),
        table_prefix=table_prefix,
        retry_total=0,
    )
    scenario = web("Uniform", {"1": 1, "2": 3, "3": 3}, timings=SLOW_HEALTH)
    try:
        with running_stack(scenario, store) as stack:
            runtime = stack.runtime(store=app_store)
            with FunctionsDriver(stack, seed=15, runtime=runtime, hold_back=0.0) as run:
                run.tick()  # the timer's audit starts the move: capacity 7 -> 8
                assert run.states() == [State.SCALING_OUT]
                stack.sim.advance(90)  # the scale-out ends: its write event is queued
                yield run, relay
    finally:
        app_store.close()
        relay.close()


def scale_out_event(run: FunctionsDriver) -> dict:
    (payload,) = [p for p in run.received if p["data"]["operationName"].endswith("/write")]
    return payload


def test_a_table_storage_outage_during_an_event_is_retried_by_event_grid(
    store, azurite, table_prefix
):
    with app_behind_a_relay(store, azurite, table_prefix) as (run, relay):
        payload = scale_out_event(run)
        relay.cut()
        assert not run.deliver_one(payload)  # TransientFailure: Event Grid retries
        run.timer()  # the timer in the outage logs and returns
        assert run.states() == [State.SCALING_OUT]
        run.check("during the outage")

        relay.heal()
        assert run.deliver_one(payload)  # the redelivery is handled...
        assert run.states() == [State.AWAITING_HEALTH]  # ...and advanced the move
        assert [d.retried for d in run.deliveries if d.event_id == payload["id"]] == [True, False]
        assert run.deliver_one(payload)  # a duplicate of it changes nothing
        run.until_settled()
        assert run.states() == [State.SUCCEEDED]
        assert len(run.app_writes()) == 2


def test_an_outage_in_the_middle_of_handling_still_lets_the_retry_through(
    store, azurite, table_prefix
):
    """Table Storage goes away after the duplicate check passed, half-way through handling:
    nothing marks the event as handled, so Event Grid's retry is handled, not taken for a
    duplicate."""
    with app_behind_a_relay(store, azurite, table_prefix) as (run, relay):
        payload = scale_out_event(run)
        app_store = run.runtime.store
        seen = app_store.event_seen

        def check_then_cut(*args):
            try:
                return seen(*args)
            finally:
                relay.cut()

        app_store.event_seen = check_then_cut
        try:
            assert not run.deliver_one(payload)  # TransientFailure: Event Grid retries
        finally:
            del app_store.event_seen
        assert not store.event_seen(payload["id"], run.stack.sim.clock.now())  # not marked

        relay.heal()
        assert run.deliver_one(payload)
        assert run.states() == [State.AWAITING_HEALTH]  # the retry advanced the move
        assert store.event_seen(payload["id"], run.stack.sim.clock.now())
        assert run.deliver_one(payload)  # and a duplicate of the retry is one again
        run.until_settled()
        assert run.states() == [State.SUCCEEDED] and len(run.app_writes()) == 2


def test_the_driver_catches_a_write_that_no_operation_step_recorded(store):
    with (
        running_stack(
            web("Uniform", {"1": 1, "2": 3, "3": 3}, timings=SLOW_HEALTH), store
        ) as stack,
        FunctionsDriver(stack, seed=16) as run,
    ):
        record = run.until_state(State.AWAITING_HEALTH)
        ref = ScaleSetRef.parse(run.ids[("rg-web", "web")])
        stack.compute.set_capacity(ref, record.target_capacity)  # the app's identity, again
        problems = run.write_problems(run.checker.check(single_scale_out=False))
        assert problems == [
            f"operation {record.operation_id} (awaiting_health): armsim received 2 set_capacity "
            "call(s), its record names 1"
        ]
