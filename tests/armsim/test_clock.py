"""Virtual and wall-clock time: VM life progresses only as the clock moves."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from armsim import ArmSim, ScaleSetSpec, Scenario, Timings, VirtualClock, WallClock
from armsim.clock import iso

from .conftest import SimFactory


def test_virtual_clock_moves_only_forward() -> None:
    clock = VirtualClock(datetime(2026, 1, 1, tzinfo=UTC))
    assert clock.advance(90).isoformat() == "2026-01-01T00:01:30+00:00"
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="timezone-aware"):
        VirtualClock(datetime(2026, 1, 1))


def test_iso_has_seven_fraction_digits_and_z() -> None:
    assert iso(datetime(2026, 11, 20, 9, 14, 3, 552198, tzinfo=UTC)) == (
        "2026-11-20T09:14:03.5521980Z"
    )


def test_health_timeline_follows_the_virtual_clock(make_sim: SimFactory) -> None:
    scenario = Scenario(
        scale_sets=(ScaleSetSpec("web", "rg", counts={"1": 1}, zones=("1", "2")),),
        timings=Timings(create=100, health=50),
    )
    sim = make_sim(scenario)
    sim.actor.set_capacity("rg", "web", 2)
    states = []
    for step in (99, 1, 49, 1):
        sim.clock.advance(step)
        vm = sim.scale_set("rg", "web").vm("1")
        states.append((vm.provisioning_state, vm.health))
    assert states == [
        ("Creating", None),
        ("Succeeded", "initializing"),
        ("Succeeded", "initializing"),
        ("Succeeded", "healthy"),
    ]


def test_ninety_minutes_of_unhealthy_vms_take_no_real_time(make_sim: SimFactory) -> None:
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec(
                "web",
                "rg",
                counts={"1": 1, "2": 2},
                zones=("1", "2"),
                new_vm_health="initializing",
                overprovision=False,
            ),
        )
    )
    sim = make_sim(scenario)
    sim.actor.set_capacity("rg", "web", 4)
    started = time.monotonic()
    for _ in range(90):
        sim.clock.advance(60)
    assert time.monotonic() - started < 5
    assert sim.scale_set("rg", "web").vm("3").health == "initializing"


def test_wall_clock_runs_by_itself() -> None:
    scenario = Scenario(
        scale_sets=(ScaleSetSpec("web", "rg", counts={"1": 1}, zones=("1", "2")),),
        timings=Timings(create=60, health=60),
    )
    with ArmSim.start(scenario, clock=WallClock(speed=600)) as sim:
        sim.actor.set_capacity("rg", "web", 2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sim.scale_set("rg", "web").vm("1").health == "healthy":
                break
            time.sleep(0.05)
        assert sim.scale_set("rg", "web").vm("1").health == "healthy"
        assert [e["eventType"] for e in sim.events] == ["Microsoft.Resources.ResourceWriteSuccess"]


def test_model_change_leaves_existing_vms_on_the_old_model(sim: ArmSim) -> None:
    sim.actor.update_scale_set(
        "rg-web",
        "web",
        {"properties": {"virtualMachineProfile": {"osProfile": {"customData": "eA=="}}}},
    )
    sim.actor.set_capacity("rg-web", "web", 14)
    web = sim.scale_set("rg-web", "web")
    assert web.vm("0").latest_model is False
    assert web.vm("13").latest_model is True
