"""Spot, priority mix, instance mix and standby pools: moved right, or skipped by name.

Against armsim (Spot evictions on its clock, priority mix placement, the low-priority quota,
instance mix and standby pool VMs) and Azurite, through the real clients.
"""

from __future__ import annotations

from armsim import EvictionSpec, QuotaSpec, ScaleSetSpec, Scenario, VmOverride
from devkit.stack import Drive, running_stack
from rebalancer.cli import EXIT_OK, build_parser, status
from rebalancer.operation import State

ENABLED = {"zone-rebalance": "enabled"}


def web(**kwargs: object) -> ScaleSetSpec:
    values: dict[str, object] = {
        "name": "web",
        "resource_group": "rg-web",
        "mode": "Flexible",
        "counts": {"1": 1, "2": 1, "3": 4},
        "tags": ENABLED,
    }
    values.update(kwargs)
    return ScaleSetSpec(**values)  # type: ignore[arg-type]


def split(stack) -> tuple[int, int]:
    vms = [vm for vm in stack.sim.scale_set("rg-web", "web").vms if vm.counts]
    spot = sum(1 for vm in vms if vm.spot)
    return len(vms) - spot, spot


# A base of 3 regular VMs and nothing regular above it: every new VM is Spot.
MIX = {"priority": "Spot", "base_regular_priority_count": 3}


def test_a_move_that_would_change_the_priority_split_is_skipped(store):
    spec = web(
        **MIX,
        overrides=(
            VmOverride(zone="1", priority="Spot"),
            VmOverride(zone="2", priority="Spot"),
            VmOverride(zone="3", count=4, priority="Regular"),
        ),
    )
    with running_stack(Scenario(scale_sets=(spec,)), store) as stack:
        assert split(stack) == (4, 2)
        run = Drive(stack)
        (result,) = run.tick()
        assert result.verdict is not None
        assert (result.verdict.decision, result.verdict.reason) == ("skip", "spot_priority_mix")
        assert "would be Spot" in result.detail and "zone 3 has no Spot VM" in result.detail
        assert "priorityMixPolicy" in result.detail
        for _ in range(10):
            run.tick()
        assert run.records() == []
        assert split(stack) == (4, 2)


def test_a_move_in_a_priority_mix_deletes_a_source_of_the_new_vms_priority(store):
    spec = web(**MIX, overrides=(VmOverride(zone="3", count=2, priority="Regular"),))
    with running_stack(Scenario(scale_sets=(spec,)), store) as stack:
        before = split(stack)
        run = Drive(stack)
        run.until_settled()
        assert [r.state for r in run.records()] == [State.SUCCEEDED] * 2
        assert split(stack) == before
        assert stack.sim.scale_set("rg-web", "web").zone_counts() == {"1": 2, "2": 2, "3": 2}


def test_a_spot_set_checks_the_low_priority_quota_not_the_size_family(store):
    # The size's family is full (0 vCPUs); Spot VMs draw on lowPriorityCores, which has room.
    quotas = (QuotaSpec("westeurope", "standardDSv5Family", 0),)
    spec = web(priority="Spot")
    with running_stack(Scenario(scale_sets=(spec,), quotas=quotas), store) as stack:
        run = Drive(stack)
        run.until_settled()
        assert [r.state for r in run.records()] == [State.SUCCEEDED] * 2


def test_a_full_low_priority_quota_waits_with_its_family_named(store):
    quotas = (QuotaSpec("westeurope", "lowPriorityCores", 12),)  # 6 Spot VMs of 2 vCPUs
    with running_stack(Scenario(scale_sets=(web(priority="Spot"),), quotas=quotas), store) as stack:
        run = Drive(stack)
        (result,) = run.tick()
        assert result.verdict is not None
        assert (result.verdict.decision, result.verdict.reason) == ("wait", "quota")
        assert "lowPriorityCores" in result.detail and "Spot VM" in result.detail
        assert run.records() == []


def test_spot_evictions_during_a_move_leave_no_orphan_and_no_unsafe_delete(store):
    evictions = tuple(
        EvictionSpec("rg-web", "web", after_seconds=seconds, zone=zone)
        for seconds, zone in ((90, "1"), (400, "3"), (900, "2"))
    )
    spec = web(priority="Spot", eviction_policy="Delete", counts={"1": 1, "2": 2, "3": 5})
    with running_stack(Scenario(scale_sets=(spec,), evictions=evictions), store) as stack:
        run = Drive(stack)
        for _ in range(60):
            run.tick()
        run.until(run.idle, what="nothing in flight")
        run.check("at the end")


def test_instance_mix_is_skipped_by_name_and_never_keyed_as_a_size(
    store, azurite, table_prefix, capsys
):
    spec = web(vm_sizes=("Standard_D2s_v5", "Standard_D2as_v5"))
    with running_stack(Scenario(scale_sets=(spec,)), store) as stack:
        run = Drive(stack)
        (result,) = run.tick()
        assert result.verdict is not None
        assert (result.verdict.decision, result.verdict.reason) == ("skip", "instance_mix")
        assert "Standard_D2s_v5, Standard_D2as_v5" in result.detail
        assert "single VM size" in result.detail
        for _ in range(5):
            run.tick()
        assert run.records() == []
        sku_reads = [r for r in stack.sim.requests if "skus" in r.operation]
        assert sku_reads == []  # no quota looked up for a size called "Mix"
        capsys.readouterr()
        args = build_parser().parse_args(
            ["status", "--table-prefix", table_prefix, "--scale-set", run.ref().id]
        )
        env = {"AzureWebJobsStorage": azurite.connection_string}
        assert status.run(args, env, now=stack.sim.clock.now()) == EXIT_OK
        shown = " ".join(capsys.readouterr().out.split())
        assert "(instance_mix)" in shown and "single VM size" in shown


def test_standby_pool_vms_are_not_counted_and_the_set_is_skipped(store):
    spec = web(counts={"1": 2, "2": 2, "3": 2}, standby={"1": 3})
    with running_stack(Scenario(scale_sets=(spec,)), store) as stack:
        run = Drive(stack)
        (result,) = run.tick()
        assert result.verdict is not None
        zones = {z: c.total for z, c in result.verdict.assessment.zones.items()}
        assert zones == {"1": 2, "2": 2, "3": 2}
        assert (result.verdict.decision, result.verdict.reason) == ("skip", "standby_pool")
        assert "3 VM(s) in a standby pool" in result.detail
        assert "detach the standby pool" in result.detail
        assert run.records() == []
