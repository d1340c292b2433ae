"""Adversarial checks of the delete path (docs/safety-review.md), against armsim and Azurite
through the real SDK clients, or pure tests of `rebalancer.operation`. Each test is a way the
app could delete the wrong VM, leave one behind, or act twice; each passes only when it can't.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from armsim import ScaleSetSpec, Scenario, VmOverride
from armsim.simulator import ARM_SCOPE
from devkit.stack import Drive, running_stack
from devkit.tables import lock_holder, save_operation
from rebalancer.clock import VirtualTime
from rebalancer.compute import ArmConfig, ComputeAdapter
from rebalancer.compute.errors import AdapterError, ErrorKind
from rebalancer.evaluator import assess
from rebalancer.model import (
    Health,
    HealthMonitoring,
    Instance,
    Inventory,
    OrchestrationMode,
    PowerState,
    ScaleSet,
    ScaleSetRef,
)
from rebalancer.operation import (
    DeleteInstances,
    OperationPolicy,
    OperationRecord,
    State,
    Step,
    advance,
    start,
)
from rebalancer.verdict import Outcome

ENABLED = {"zone-rebalance": "enabled"}
NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def two_zones(mode: str, counts: dict[str, int]) -> Scenario:
    spec = ScaleSetSpec("web", "rg-web", mode=mode, zones=("1", "2"), counts=counts, tags=ENABLED)
    return Scenario(scale_sets=(spec,))


def test_a_protected_flexible_vm_is_never_chosen_as_source_after_the_scale_out(store):
    """Flexible lists carry no protection; it is read only for planned sources. After the
    scale-out the set is balanced (1/3 + 1 new = 2/3), so no source is planned any more and
    the delete must still not pick the protected VM that the first plan avoided."""
    with running_stack(two_zones("Flexible", {"1": 1, "2": 3}), store) as stack:
        zone_2 = sorted(
            vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms if vm.zone == "2"
        )
        best = zone_2[-1]  # the platform's scale-in order: highest id first
        stack.sim.actor.protect("rg-web", "web", best)
        run = Drive(stack)
        run.until_terminal()
        present = {vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms}
        assert best in present
        (record,) = run.records()
        assert record.state is State.SUCCEEDED
        assert best not in record.sources


def test_flexible_protection_applies_to_vm_names_with_capital_letters(store):
    """Flexible VM names are `<scale set name>_<suffix>`, so `WebFront_...` is common; the
    protection read for a planned source must mark that very VM."""
    spec = ScaleSetSpec(
        "WebFront",
        "rg-web",
        mode="Flexible",
        zones=("1", "2"),
        counts={"1": 1, "2": 3},
        tags=ENABLED,
        overrides=(VmOverride(zone="2", count=3, protect_from_scale_in=True),),
    )
    with running_stack(Scenario(scale_sets=(spec,)), store) as stack:
        view = stack.sim.scale_set("rg-web", "WebFront")
        inventory = stack.compute.read_inventory(ScaleSetRef.parse(view.id), NOW)
        zone_2 = [i for i in inventory.instances if i.zone == "2"]
        assert len(zone_2) == 3 and all(i.protected for i in zone_2)
        assert assess(inventory).moves == ()
        run = Drive(stack, names=(("rg-web", "WebFront"),))
        for _ in range(6):
            run.tick()
        assert run.records("WebFront") == []
        assert run.app_deletes() == []


@pytest.mark.parametrize("mode", ["Uniform", "Flexible"])
def test_delete_instances_reads_protection_again_right_before_deleting(store, mode):
    """The observation a delete was decided on may be minutes old: a VM protected since then
    is left out, and when every id is protected nothing is deleted at all."""
    with running_stack(two_zones(mode, {"1": 2, "2": 3}), store) as stack:
        view = stack.sim.scale_set("rg-web", "web")
        ref = ScaleSetRef.parse(view.id)
        first, second = sorted(vm.instance_id for vm in view.vms if vm.zone == "2")[:2]
        stack.sim.actor.protect("rg-web", "web", first, scale_in=False, scale_set_actions=True)
        call = stack.compute.delete_instances(ref, (first, second))
        assert call.instance_ids == (second,)
        with pytest.raises(AdapterError) as refused:
            stack.compute.delete_instances(ref, (first,))
        assert refused.value.code == "InstanceProtected" and first in refused.value.message
        stack.sim.advance(600)
        present = {vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms}
        assert first in present and second not in present


def scale_set_ref(stack, name: str = "web", resource_group: str = "rg-web") -> ScaleSetRef:
    return ScaleSetRef.parse(stack.sim.scale_set(resource_group, name).id)


def test_a_reconcile_that_wrote_a_step_gives_the_lock_back(store):
    """Every commit renews the lock under a new ETag; releasing with the ETag it was
    acquired with fails, so the lease then blocks every other instance for its full length
    and their events end `busy` (acknowledged, not retried)."""
    with running_stack(two_zones("Uniform", {"1": 1, "2": 3}), store) as stack:
        ref = scale_set_ref(stack)
        result = stack.reconciler().reconcile(ref)
        assert result.outcome is Outcome.STARTED
        assert lock_holder(stack.store, ref.key, stack.sim.clock.now()) is None
        other = stack.reconciler().reconcile(ref)  # another instance, seconds later
        assert other.outcome is not Outcome.BUSY


def test_one_unreadable_operation_record_does_not_stop_every_other_scale_set(store):
    """A record this version cannot read (another schema after an upgrade, a hand edit) must
    stall its own scale set only: the timer still advances the others and still audits."""
    specs = tuple(
        ScaleSetSpec(name, "rg-web", zones=("1", "2"), counts={"1": 1, "2": 3}, tags=ENABLED)
        for name in ("web", "api")
    )
    with running_stack(Scenario(scale_sets=specs), store) as stack:
        reconciler = stack.reconciler()
        assert reconciler.reconcile(scale_set_ref(stack, "api")).outcome is Outcome.STARTED
        assert reconciler.reconcile(scale_set_ref(stack, "web")).outcome is Outcome.STARTED
        web = stack.store.active_operation(scale_set_ref(stack, "web").key)
        body = json.loads(web.body)
        body["schema"] = 2
        save_operation(stack.store, replace(web, body=json.dumps(body)))
        stack.sim.advance(300)
        results = reconciler.advance_all()
        api = [r for r in results if r.ref == scale_set_ref(stack, "api")]
        assert [r.outcome for r in api] == [Outcome.ADVANCED]


def test_an_operation_stands_down_when_its_resource_group_leaves_the_scope(store):
    """Narrowing REBALANCER_RESOURCE_GROUPS is how an operator takes a group away from the
    app: an in-flight operation there must not go on to delete the group's VMs."""
    with running_stack(two_zones("Uniform", {"1": 1, "2": 3}), store) as stack:
        ref = scale_set_ref(stack)
        before = {vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms}
        assert stack.reconciler().reconcile(ref).outcome is Outcome.STARTED
        narrowed = replace(stack.settings, resource_groups=("rg-other",))
        reconciler = stack.reconciler(settings=narrowed)
        for _ in range(40):
            reconciler.advance_all()
            stack.sim.advance(60)
        after = {vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms}
        assert before <= after  # none of the group's own VMs was deleted
        (row,) = stack.store.history(ref.key, limit=5)
        assert OperationRecord.from_json(row.body).state is not State.SUCCEEDED


# -- pure: rebalancer.operation ----------------------------------------------------------------

POLICY = OperationPolicy()
OP_REF = ScaleSetRef("00000000-0000-0000-0000-000000000001", "rg-web", "web")


def instance(vm_id: str, zone: str, health: Health = Health.HEALTHY) -> Instance:
    return Instance(vm_id, f"web_{vm_id}", zone, "Succeeded", PowerState.RUNNING, health)


def observed(capacity: int, instances: tuple[Instance, ...], at: datetime) -> Inventory:
    scale_set = ScaleSet(
        ref=OP_REF,
        location="westeurope",
        zones=("1", "2"),
        sku_name="Standard_D2s_v5",
        capacity=capacity,
        mode=OrchestrationMode.UNIFORM,
        provisioning_state="Succeeded",
        health_monitoring=HealthMonitoring.EXTENSION,
        platform_rebalancing=False,
    )
    return Inventory(scale_set, instances, at)


def ready_to_delete() -> tuple[OperationRecord, tuple[Instance, ...], datetime]:
    """An operation whose new VM is healthy: the next fresh observation deletes a source."""
    baseline = (instance("0", "1"), instance("1", "2"), instance("2", "2"), instance("3", "2"))
    record, _ = start(
        observed(4, baseline, NOW), assess(observed(4, baseline, NOW)), POLICY, NOW, "op"
    )
    grown = (*baseline, instance("4", "1"))
    now = NOW + timedelta(minutes=10)
    step = advance(record, observed(5, grown, now), POLICY, now)
    assert step.record.state is State.AWAITING_HEALTH
    step = advance(step.record, observed(5, grown, now), POLICY, now)
    assert step.record.state is State.SCALING_IN and not step.commands[:-1]
    return step.record, grown, now


def deletes(step: Step) -> tuple[str, ...]:
    return tuple(vm for c in step.commands if isinstance(c, DeleteInstances) for vm in c.ids)


def test_a_source_is_deleted_on_a_fresh_observation():
    record, grown, now = ready_to_delete()
    assert deletes(advance(record, observed(5, grown, now), POLICY, now)) == ("3",)


def test_a_source_is_never_deleted_on_an_observation_that_began_long_ago():
    """A read slowed by throttling (minutes of Retry-After) may show the new VM healthy while
    it has failed since: the source is chosen and deleted on a fresh read only."""
    record, grown, now = ready_to_delete()
    slow = observed(5, grown, now - POLICY.max_observation_age - timedelta(seconds=1))
    step = advance(record, slow, POLICY, now)
    assert deletes(step) == () and step.record == record
    # A delete that did not land is repeated on a fresh observation only, too.
    requested = advance(record, observed(5, grown, now), POLICY, now).record
    later = now + timedelta(minutes=5)
    assert deletes(advance(requested, observed(5, grown, later), POLICY, later)) == ("3",)
    stale = observed(5, grown, later - timedelta(minutes=3))
    assert deletes(advance(requested, stale, POLICY, later)) == ()


def test_the_adapter_never_acts_on_a_scale_set_of_another_subscription(store):
    """The SDK client is bound to the app's subscription and takes only a group and a name:
    a ref of another subscription (a shared table, a forged event) would reach the app's own
    set of that name. Every call must refuse it before sending anything."""
    with running_stack(two_zones("Uniform", {"1": 2, "2": 3}), store) as stack:
        ours = scale_set_ref(stack)
        foreign = ScaleSetRef("11111111-1111-4111-8111-111111111111", "rg-web", "web")
        victim = sorted(vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms)[-1]
        stack.sim.clear_requests()
        calls = (
            lambda: stack.compute.delete_instances(foreign, (victim,)),
            lambda: stack.compute.set_capacity(foreign, 9),
            lambda: stack.compute.read_inventory(foreign, NOW),
        )
        for call in calls:
            with pytest.raises(AdapterError) as refused:
                call()
            assert refused.value.kind is ErrorKind.INVALID
            assert foreign.subscription_id in refused.value.message
        assert stack.sim.requests == []
        stack.sim.advance(600)
        view = stack.sim.scale_set("rg-web", "web")
        assert victim in {vm.instance_id for vm in view.vms} and view.capacity == 5
        assert stack.compute.read_inventory(ours, NOW).scale_set.ref == ours


def test_a_delete_is_not_sent_once_the_caller_lost_the_scale_set_while_reading(store):
    """The reconciler checks its lease before calling delete_instances, but the fresh
    protection reads inside may wait out throttling past it: the caller's check is asked
    again right before the delete request itself."""
    with running_stack(two_zones("Uniform", {"1": 2, "2": 3}), store) as stack:
        ref = scale_set_ref(stack)
        victim = sorted(vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms)[-1]
        asked: list[int] = []

        def still_ours() -> bool:
            asked.append(len(stack.sim.requests))  # asked after the protection GET
            return False

        stack.sim.clear_requests()
        with pytest.raises(AdapterError) as refused:
            stack.compute.delete_instances(ref, (victim,), still_ours=still_ours)
        assert refused.value.kind is ErrorKind.CONFLICT and refused.value.code == "LeaseExpired"
        assert asked == [1] and [r.method for r in stack.sim.requests] == ["GET"]
        assert stack.compute.delete_instances(ref, (victim,), still_ours=lambda: True)
        stack.sim.advance(600)
        assert victim not in {vm.instance_id for vm in stack.sim.scale_set("rg-web", "web").vms}


def test_possible_sources_cover_the_first_baseline_vm_behind_new_ones():
    """A new VM the operation discards may sort first in the fullest zone (Flexible names are
    random); the operation skips its own VMs, so the next one must have been read too."""
    from rebalancer.protection import source_candidates

    vms = (
        instance("a", "1"),
        instance("b", "1"),
        instance("c", "2"),
        instance("d", "2"),
        instance("zz-new", "2"),  # created by the operation, first in scale-in order
    )
    candidates = source_candidates(observed(5, vms, NOW), depth=1)
    assert {"zz-new", "d"} <= set(candidates) and "c" not in candidates


def test_no_delete_leaves_after_the_lease_ran_out_during_the_pre_delete_reads(store):
    """The reconciler checks its lease before delete_instances, whose fresh protection read
    is then throttled for longer than the lease (Retry-After 400 s, waited out): by the time
    the delete request would go, another instance may own the scale set."""
    with running_stack(two_zones("Uniform", {"1": 1, "2": 3}), store) as stack:
        ref = scale_set_ref(stack)
        run = Drive(stack)
        run.until(
            lambda: [r.state for r in run.records()] == [State.AWAITING_HEALTH],
            what="an operation waiting for its new VM",
        )
        stack.sim.advance(900)  # the new VM reports healthy
        config = ArmConfig.from_settings(
            stack.settings,
            ca_cert=stack.sim.ca_cert_path,
            credential_scopes=(ARM_SCOPE,),
            max_wait=600.0,
        )
        patient = ComputeAdapter(
            config, credential=stack.sim.credential, clock=VirtualTime(stack.sim.clock)
        )
        stack.sim.faults.add(kind="throttle", operation="vmss_vm.get", retry_after=400, count=1)
        stack.sim.clear_requests()
        try:
            stack.reconciler(compute=patient).reconcile(ref)
        finally:
            patient.close()
        throttled = [r.time for r in stack.sim.requests if r.status == 429]
        deletes = [r.time for r in stack.sim.requests if r.operation == "vmss.delete_instances"]
        assert throttled, "the pass never reached the delete"
        assert deletes == []
