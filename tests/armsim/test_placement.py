"""Placement and scale-in order: pure functions, checked directly and by property."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from armsim.placement import placement_order, scale_in_order
from armsim.resources import ScaleSetState, Vm

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def scale_set() -> ScaleSetState:
    return ScaleSetState(
        subscription_id="s",
        resource_group="rg",
        name="web",
        location="westeurope",
        mode="Uniform",
        sku="Standard_D2s_v5",
        zones=("1", "2", "3"),
        capacity=0,
        tags={},
        health_monitoring="extension",
        platform_rebalancing=False,
        zone_balance=False,
        terminate_notification_seconds=None,
        new_vm_health="healthy",
        unique_id="u",
        created=T0,
    )


def vms(zones: list[str], protected: list[bool], failed: list[bool]) -> list[Vm]:
    ss = scale_set()
    return [
        Vm(
            serial=i,
            scale_set=ss,
            instance_id=str(i),
            name=f"web_{i}",
            zone=zone,
            vm_id=str(i),
            created=T0,
            provisioning_state="Failed" if bad else "Succeeded",
            protect_from_scale_in=guard,
        )
        for i, (zone, guard, bad) in enumerate(zip(zones, protected, failed, strict=True))
    ]


def test_placement_prefers_the_emptiest_zones_in_zone_order() -> None:
    counts = {"1": 2, "2": 4, "3": 2}
    assert placement_order(["1", "2", "3"], counts, strict=False) == ["1", "3", "2"]
    assert placement_order(["1", "2", "3"], counts, strict=True) == ["1", "3"]
    assert placement_order([None], {}, strict=False) == [None]


def test_scale_in_takes_failed_then_fullest_zone_highest_id() -> None:
    members = vms(["1", "2", "2", "3", "2"], [False] * 5, [False, False, False, True, False])
    counts = {"1": 1, "2": 3, "3": 0}
    assert [vm.instance_id for vm in scale_in_order(members, counts, 3)] == ["3", "4", "2"]


def test_protection_from_scale_set_actions_also_guards_against_scale_in() -> None:
    members = vms(["1", "1"], [False, False], [False, False])
    members[1].protect_from_scale_set_actions = True
    assert [vm.instance_id for vm in scale_in_order(members, {"1": 2}, 2)] == ["0"]


@given(
    st.lists(
        st.tuples(st.sampled_from(["1", "2", "3"]), st.booleans(), st.booleans()),
        max_size=12,
    ),
    st.integers(min_value=0, max_value=14),
)
def test_scale_in_never_takes_protected_vms(spec: list[tuple[str, bool, bool]], count: int) -> None:
    members = vms([z for z, _, _ in spec], [p for _, p, _ in spec], [f for _, _, f in spec])
    counts: dict[str | None, int] = {}
    for vm in members:
        counts[vm.zone] = counts.get(vm.zone, 0) + 1
    chosen = scale_in_order(members, counts, count)
    unprotected = [vm for vm in members if not vm.protect_from_scale_in]
    assert len(chosen) == min(count, len(unprotected))
    assert len({vm.serial for vm in chosen}) == len(chosen)
    assert not any(vm.protect_from_scale_in for vm in chosen)
