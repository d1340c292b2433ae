"""Properties of the move plan over random fleets (hypothesis)."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from rebalancer.evaluator import (
    Decision,
    ZoneCount,
    assess,
    eligible_sources,
    is_balanced,
    is_eligible_source,
    plan_moves,
    zone_counts,
)
from rebalancer.model import Health, Instance, PowerState
from tests.fleets import inventory, scale_set, vm

EXAMPLES = settings(max_examples=250, deadline=None)


@st.composite
def fleets(draw, *, all_active: bool = False) -> tuple[tuple[str, ...], tuple[Instance, ...]]:
    """A zone list and VMs spread over it, with unique numeric instance ids."""
    zones = tuple(str(n) for n in range(1, draw(st.integers(2, 4)) + 1))
    size = draw(st.integers(0, 40))
    ids = draw(st.lists(st.integers(0, 999), min_size=size, max_size=size, unique=True))
    instances = []
    for vm_id in ids:
        zone = draw(st.sampled_from(zones))
        if all_active:
            instances.append(vm(vm_id, zone))
            continue
        instances.append(
            vm(
                vm_id,
                zone,
                power=draw(st.sampled_from(list(PowerState))),
                health=draw(st.sampled_from(list(Health))),
                state=draw(st.sampled_from(["Succeeded"] * 4 + ["Deleting", "Failed", "Creating"])),
                protected=draw(st.booleans()),
                latest=draw(st.booleans()),
            )
        )
    return zones, tuple(instances)


def minimum_moves(counts: Mapping[str, ZoneCount]) -> int:
    """Fewest single-VM moves that bring the totals within +/-1 of each other."""
    totals = sorted((count.total for count in counts.values()), reverse=True)
    base, extra = divmod(sum(totals), len(totals))
    targets = [base + 1] * extra + [base] * (len(totals) - extra)
    return sum(max(0, total - target) for total, target in zip(totals, targets, strict=True))


def replay(counts: Mapping[str, ZoneCount], moves) -> list[dict[str, ZoneCount]]:
    """The counts before each move and after the last one."""
    steps = [dict(counts)]
    for move in moves:
        now = dict(steps[-1])
        giver, receiver = now[move.from_zone], now[move.to_zone]
        now[move.from_zone] = ZoneCount(giver.total - 1, giver.active - 1)
        now[move.to_zone] = ZoneCount(receiver.total + 1, receiver.active + 1)
        steps.append(now)
    return steps


@EXAMPLES
@given(fleets(all_active=True))
def test_an_all_active_unprotected_fleet_always_reaches_balance_in_minimum_moves(fleet) -> None:
    zones, instances = fleet
    scale = scale_set(zones)
    counts = zone_counts(scale, instances)
    moves = plan_moves(scale, instances)
    assert is_balanced(replay(counts, moves)[-1])
    assert len(moves) == minimum_moves(counts)


@EXAMPLES
@given(fleets(all_active=True), st.data())
def test_balance_is_reached_whenever_each_zone_can_give_its_surplus(fleet, data) -> None:
    zones, instances = fleet
    scale = scale_set(zones)
    floor = len(instances) // len(zones)
    # protect VMs, but leave every zone enough unprotected ones to come down to the floor
    protected = set()
    for zone in zones:
        members = [i for i in instances if i.zone == zone]
        keep_free = max(0, len(members) - floor)
        chosen = data.draw(st.integers(0, len(members) - keep_free))
        protected.update(i.id for i in members[:chosen])
    instances = tuple(
        vm(i.id, i.zone, protected=True) if i.id in protected else i for i in instances
    )
    counts = zone_counts(scale, instances)
    moves = plan_moves(scale, instances)
    assert is_balanced(replay(counts, moves)[-1])
    assert len(moves) == minimum_moves(counts)


@EXAMPLES
@given(fleets())
def test_every_move_goes_fullest_to_emptiest_and_respects_the_active_rule(fleet) -> None:
    zones, instances = fleet
    scale = scale_set(zones)
    moves = plan_moves(scale, instances)
    steps = replay(zone_counts(scale, instances), moves)
    for move, before in zip(moves, steps, strict=False):
        totals = [count.total for count in before.values()]
        assert not is_balanced(before)
        assert before[move.from_zone].total == max(totals)
        assert before[move.to_zone].total == min(totals)
        assert before[move.to_zone].active < before[move.from_zone].active


@EXAMPLES
@given(fleets())
def test_never_more_than_the_minimum_number_of_moves(fleet) -> None:
    zones, instances = fleet
    scale = scale_set(zones)
    counts = zone_counts(scale, instances)
    moves = plan_moves(scale, instances)
    assert len(moves) <= minimum_moves(counts)
    if is_balanced(replay(counts, moves)[-1]):
        assert len(moves) == minimum_moves(counts)


@EXAMPLES
@given(fleets())
def test_sources_are_eligible_from_their_zone_and_used_once(fleet) -> None:
    zones, instances = fleet
    by_id = {instance.id: instance for instance in instances}
    moves = plan_moves(scale_set(zones), instances)
    sources = [move.source for move in moves]
    assert len(sources) == len(set(sources))
    for move in moves:
        source = by_id[move.source]
        assert is_eligible_source(source)
        assert not source.protected and not source.deallocated
        assert not source.deleting and not source.failed
        assert source.zone == move.from_zone


@EXAMPLES
@given(fleets())
def test_sources_come_in_the_documented_order_within_a_zone(fleet) -> None:
    zones, instances = fleet
    moves = plan_moves(scale_set(zones), instances)
    for zone in zones:
        taken = [move.source for move in moves if move.from_zone == zone]
        ordered = [i.id for i in eligible_sources(instances, zone)]
        assert taken == ordered[: len(taken)]


@EXAMPLES
@given(fleets(), st.randoms(use_true_random=False))
def test_the_plan_does_not_depend_on_input_order(fleet, random) -> None:
    zones, instances = fleet
    shuffled = list(instances)
    random.shuffle(shuffled)
    assert plan_moves(scale_set(zones), instances) == plan_moves(scale_set(zones), shuffled)
    assert assess(inventory(instances, scale_set(zones))) == assess(
        inventory(shuffled, scale_set(zones))
    )


@EXAMPLES
@given(fleets())
def test_the_decision_matches_the_plan(fleet) -> None:
    zones, instances = fleet
    result = assess(inventory(instances, scale_set(zones)))
    assert (result.decision is Decision.MOVE) == bool(result.moves)
    assert (result.decision is Decision.NONE) == result.balanced
    assert result.projected == replay(result.zones, result.moves)[-1]
    assert sum(c.total for c in result.zones.values()) + len(result.excluded) == len(instances)
