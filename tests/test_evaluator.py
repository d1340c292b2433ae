"""The balance evaluator on the documented cases and on each eligibility rule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rebalancer.evaluator import (
    Assessment,
    Decision,
    Move,
    Reason,
    ZoneCount,
    assess,
    eligible_sources,
    is_balanced,
    plan_moves,
    zone_counts,
)
from rebalancer.model import Health, HealthMonitoring, OrchestrationMode, PowerState
from tests.fleets import REF, fleet, inventory, scale_set, vm


def totals(counts) -> tuple[int, ...]:
    return tuple(count.total for count in counts.values())


# --- the four documented cases ----------------------------------------------------------


def test_1_3_3_moves_one_vm_into_zone_1() -> None:
    result = assess(inventory(fleet(("1", 1, 0), ("2", 3, 0), ("3", 3, 0))))
    assert result.decision is Decision.MOVE
    assert result.reason is Reason.MOVES_PLANNED
    assert not result.balanced
    assert result.zones == {"1": ZoneCount(1, 1), "2": ZoneCount(3, 3), "3": ZoneCount(3, 3)}
    # zones 2 and 3 tie (3 total, 3 active): the first by name gives its highest instance id
    assert result.moves == (Move(from_zone="2", to_zone="1", source="3"),)
    assert totals(result.projected) == (2, 2, 3)


def test_5_5_5_with_zone_3_deallocated_is_balanced() -> None:
    result = assess(inventory(fleet(("1", 5, 0), ("2", 5, 0), ("3", 0, 5))))
    assert result.balanced
    assert result.decision is Decision.NONE
    assert result.reason is Reason.BALANCED
    assert result.zones["3"] == ZoneCount(total=5, active=0)
    assert result.moves == ()


def test_7_4_4_with_five_deallocated_is_not_moved() -> None:
    result = assess(inventory(fleet(("1", 2, 5), ("2", 4, 0), ("3", 4, 0))))
    assert not result.balanced
    assert result.decision is Decision.SKIP
    assert result.reason is Reason.ACTIVE_SPREAD
    assert result.moves == ()
    assert result.zones["1"] == ZoneCount(total=7, active=2)
    assert result.detail == "fullest: zone 1 (7 VMs, 2 active); emptiest: zone 2 (4 VMs, 4 active)"


def test_2_4_7_with_two_deallocated_ends_at_4_4_5() -> None:
    instances = fleet(("1", 2, 0), ("2", 4, 0), ("3", 5, 2))
    result = assess(inventory(instances))
    assert result.decision is Decision.MOVE
    assert result.moves == (Move("3", "1", "10"), Move("3", "1", "9"))
    assert result.projected == {"1": ZoneCount(4, 4), "2": ZoneCount(4, 4), "3": ZoneCount(5, 3)}
    deallocated = {i.id for i in instances if i.power_state is PowerState.DEALLOCATED}
    assert not deallocated & {move.source for move in result.moves}


# --- counting ---------------------------------------------------------------------------


def test_zone_counts_include_empty_zones_in_zone_order() -> None:
    counts = zone_counts(scale_set(("3", "10", "2")), [vm(0, "3"), vm(1, "3")])
    assert list(counts) == ["2", "3", "10"]
    assert counts == {"2": ZoneCount(0, 0), "3": ZoneCount(2, 2), "10": ZoneCount(0, 0)}


def test_deleting_and_allocation_failed_vms_do_not_count_and_are_listed() -> None:
    instances = (
        vm(0, "1"),
        vm(1, "1", state="Deleting"),
        vm(2, "2", state="Failed", failure="ZonalAllocationFailed"),
        vm(3, "2"),
        vm(4, "3", state="Creating"),
        vm(5, "3", power=PowerState.STOPPED),
    )
    result = assess(inventory(instances))
    assert result.zones == {"1": ZoneCount(1, 1), "2": ZoneCount(1, 1), "3": ZoneCount(2, 0)}
    assert result.excluded == ("1", "2")


def test_vms_whose_extensions_failed_count_like_deallocated_ones() -> None:
    """Azure's zone-balancing page: a VM created whose extensions failed to deploy still
    counts toward zone balance; it is not active, so it is never a source."""
    failed = vm(2, "2", state="Failed", failure="VMExtensionProvisioningError")
    instances = (vm(0, "1"), vm(1, "2"), failed, vm(3, "3"))
    result = assess(inventory(instances))
    assert result.zones == {"1": ZoneCount(1, 1), "2": ZoneCount(2, 1), "3": ZoneCount(1, 1)}
    assert result.balanced and result.excluded == ()
    assert eligible_sources(instances, "2") == (instances[1],)


@pytest.mark.parametrize(
    ("spread", "expected"),
    [((), True), ((4,), True), ((3, 4, 4), True), ((3, 3, 3), True), ((2, 4, 3), False)],
)
def test_is_balanced_allows_one_vm_of_difference(spread, expected) -> None:
    counts = {str(n): ZoneCount(total, total) for n, total in enumerate(spread)}
    assert is_balanced(counts) is expected


# --- sources ----------------------------------------------------------------------------


def test_eligible_sources_order_unhealthy_then_unknown_then_outdated_then_highest_id() -> None:
    instances = [
        vm(2, "1"),
        vm(10, "1"),
        vm(9, "1", latest=False),
        vm(3, "1", health=Health.UNHEALTHY),
        vm(1, "1", health=Health.UNKNOWN, latest=False),
        vm(7, "2", health=Health.UNHEALTHY),
    ]
    # Seen unhealthy before health unknown: only the first may go beside a replacement that
    # never turned healthy, so the health timeout's rule can apply.
    assert [i.id for i in eligible_sources(instances, "1")] == ["3", "1", "9", "10", "2"]


def test_eligible_sources_never_include_protected_deallocated_deleting_or_failed() -> None:
    instances = [
        vm(0, "1", protected=True),
        vm(1, "1", power=PowerState.DEALLOCATED),
        vm(2, "1", state="Deleting"),
        vm(3, "1", state="Failed"),
        vm(4, "1", power=PowerState.STOPPED),
        vm(5, "1", state="Creating"),
        vm(6, "1"),
    ]
    assert [i.id for i in eligible_sources(instances, "1")] == ["6"]


def test_flexible_names_sort_after_each_other_lexically() -> None:
    instances = [vm("web_a1", "1"), vm("web_c3", "1"), vm("web_b2", "1")]
    assert [i.id for i in eligible_sources(instances, "1")] == ["web_c3", "web_b2", "web_a1"]


def test_protected_sources_are_skipped_and_next_zone_at_maximum_gives() -> None:
    instances = (
        *(vm(n, "1") for n in range(1)),
        *(vm(n, "2", protected=True) for n in range(1, 5)),
        *(vm(n, "3") for n in range(5, 9)),
    )
    assert plan_moves(scale_set(), instances) == (Move("3", "1", "8"),)


def test_all_sources_protected_is_a_named_skip() -> None:
    instances = (vm(0, "1"), *(vm(n, "2", protected=True) for n in range(1, 5)), vm(5, "3"))
    result = assess(inventory(instances))
    assert result.decision is Decision.SKIP
    assert result.reason is Reason.NO_ELIGIBLE_SOURCE
    assert result.moves == ()
    assert result.detail == "zone 2 holds the most VMs (4) and none can move: 4 protected"


def test_plan_stops_when_sources_run_out_and_says_so() -> None:
    instances = (*(vm(n, "2", protected=n > 0) for n in range(6)), vm(6, "3"), vm(7, "3"))
    result = assess(inventory(instances))
    assert result.decision is Decision.MOVE
    assert result.moves == (Move("2", "1", "0"),)
    assert result.detail.endswith(
        "stops short of +/-1 (no_eligible_source): zone 2 holds the most VMs (5) and none can "
        "move: 5 protected"
    )
    assert not is_balanced(result.projected)


def test_the_receiver_is_the_emptiest_zone_with_fewest_active() -> None:
    # zones 1 and 2 hold 1 VM each, zone 2's is deallocated: zone 2 receives first
    instances = (
        vm(0, "1"),
        vm(1, "2", power=PowerState.DEALLOCATED),
        *(vm(n, "3") for n in range(2, 8)),
    )
    assert [move.to_zone for move in plan_moves(scale_set(), instances)] == ["2", "1", "2"]


def test_two_zones_move_until_within_one() -> None:
    instances = tuple(vm(n, "2") for n in range(9))
    moves = plan_moves(scale_set(("1", "2")), instances)
    assert moves == tuple(Move("2", "1", str(n)) for n in (8, 7, 6, 5))


# --- eligibility ------------------------------------------------------------------------

BALANCED_FLEET = fleet(("1", 1, 0), ("2", 3, 0), ("3", 3, 0))


@pytest.mark.parametrize(
    ("scale", "reason"),
    [
        (scale_set(("1",)), Reason.NOT_ZONAL),
        (scale_set(()), Reason.NOT_ZONAL),
        (scale_set(platform_rebalancing=True), Reason.PLATFORM_REBALANCING),
        (scale_set(sku=None), Reason.NO_SKU),
        (scale_set(monitoring=HealthMonitoring.NONE), Reason.NO_HEALTH_MONITORING),
        (
            scale_set(
                mode=OrchestrationMode.FLEXIBLE, monitoring=HealthMonitoring.LOAD_BALANCER_PROBE
            ),
            Reason.NO_HEALTH_MONITORING,
        ),
        (scale_set(state="Deleting"), Reason.SCALE_SET_DELETING),
        (scale_set(state="Updating"), Reason.SCALE_SET_NOT_SUCCEEDED),
        (scale_set(state="Failed"), Reason.SCALE_SET_NOT_SUCCEEDED),
    ],
)
def test_ineligible_scale_sets_are_skipped_with_a_named_reason(scale, reason) -> None:
    result = assess(inventory(BALANCED_FLEET, scale))
    assert result.decision is Decision.SKIP
    assert result.reason is reason
    assert result.moves == ()
    assert result.detail


def test_uniform_with_a_load_balancer_probe_is_eligible() -> None:
    scale = scale_set(monitoring=HealthMonitoring.LOAD_BALANCER_PROBE)
    assert assess(inventory(BALANCED_FLEET, scale)).decision is Decision.MOVE


@pytest.mark.parametrize(
    ("mode", "read_path"),
    [
        (OrchestrationMode.UNIFORM, "virtualMachineScaleSets/web/virtualMachines"),
        (OrchestrationMode.FLEXIBLE, "virtualMachineScaleSet/id"),
    ],
)
def test_health_never_reported_is_a_named_skip_naming_the_read_path(mode, read_path) -> None:
    """Monitoring is configured but no VM reports vmHealth where the app reads it: a new VM
    could never be confirmed healthy, and no source is known to be unhealthy."""
    silent = tuple(replace(i, health=Health.NOT_REPORTED) for i in BALANCED_FLEET)
    result = assess(inventory(silent, scale_set(mode=mode)))
    assert result.decision is Decision.SKIP
    assert result.reason is Reason.HEALTH_NOT_REPORTED
    assert read_path in result.detail and "vmHealth" in result.detail


def test_one_vm_reporting_health_is_enough_to_observe_it() -> None:
    silent = [replace(i, health=Health.NOT_REPORTED) for i in BALANCED_FLEET]
    silent[0] = replace(silent[0], health=Health.UNHEALTHY)
    assert assess(inventory(silent)).reason is Reason.MOVES_PLANNED


@pytest.mark.parametrize("zone", [None, "4"])
def test_vms_outside_the_configured_zones_are_a_named_skip(zone) -> None:
    result = assess(inventory((*BALANCED_FLEET, vm(99, zone))))
    assert result.reason is Reason.INSTANCES_OUTSIDE_ZONES
    assert "99" in result.detail


def test_a_deleting_vm_outside_the_zones_does_not_block() -> None:
    result = assess(inventory((*BALANCED_FLEET, vm(99, None, state="Deleting"))))
    assert result.reason is Reason.MOVES_PLANNED
    assert result.excluded == ("99",)


def test_an_empty_scale_set_is_balanced() -> None:
    result = assess(inventory(()))
    assert result.reason is Reason.BALANCED
    assert result.zones == {"1": ZoneCount(0, 0), "2": ZoneCount(0, 0), "3": ZoneCount(0, 0)}


def test_every_reason_has_a_sentence_and_a_decision() -> None:
    for reason in Reason:
        assert reason.describe().endswith(".")
        assert isinstance(reason.decision, Decision)
    assert {reason.decision for reason in Reason} == set(Decision)


def test_assessment_names_under_and_over_provisioned_zones() -> None:
    result: Assessment = assess(inventory(fleet(("1", 1, 0), ("2", 3, 0), ("3", 3, 0))))
    assert result.ref == REF
    assert result.under_provisioned == ("1",)
    assert result.over_provisioned == ("2", "3")
    balanced = assess(inventory(fleet(("1", 2, 0), ("2", 3, 0), ("3", 3, 0))))
    assert balanced.under_provisioned == () == balanced.over_provisioned
