"""The gates as pure functions: where each one starts and stops holding a move."""

from __future__ import annotations

from datetime import timedelta

from rebalancer import gates
from rebalancer.model import RollingUpgrade
from rebalancer.settings import Mode, OptIn
from rebalancer.verdict import Gate
from tests.fleets import OBSERVED_AT, scale_set

NOW = OBSERVED_AT
COOLDOWN = timedelta(minutes=15)


def test_cooldown_holds_until_its_end_and_not_at_it():
    assert gates.cooldown(None, COOLDOWN, NOW) is None
    held = gates.cooldown(NOW - COOLDOWN + timedelta(seconds=1), COOLDOWN, NOW)
    assert held is not None and held[0] is Gate.COOLDOWN
    assert "REBALANCER_COOLDOWN_MINUTES" in held[1]
    assert gates.cooldown(NOW - COOLDOWN, COOLDOWN, NOW) is None


def test_min_interval_counts_from_the_last_operations_end():
    interval = timedelta(hours=1)
    held = gates.min_interval(NOW - timedelta(minutes=59), interval, NOW)
    assert held is not None and held[0] is Gate.MIN_INTERVAL
    assert gates.min_interval(NOW - interval, interval, NOW) is None
    assert gates.min_interval(None, interval, NOW) is None


def test_a_silent_change_ignores_the_apps_own_vms_and_names_the_others():
    before, ours = {"0", "1", "2"}, {"2", "7"}
    assert gates.silent_change(before, {"0", "1", "7"}, ours, NOW, COOLDOWN, NOW) is None
    held = gates.silent_change(before, {"0", "7", "9"}, ours, NOW, COOLDOWN, NOW)
    assert held is not None and held[0] is Gate.COOLDOWN
    assert "gone: 1" in held[1] and "new: 9" in held[1]


def test_opt_in_and_mode_come_before_someone_elses_update():
    updating = scale_set(state="Updating")
    assert gates.opted_out(OptIn.DISABLED) is not None
    assert gates.opted_out(OptIn.ENABLED) is None
    held = gates.not_allowed(OptIn.ENABLED, Mode.AUDIT, updating)
    assert held is not None and held[0] is Gate.MODE_AUDIT
    held = gates.not_allowed(OptIn.ENABLED, Mode.ENFORCE, updating)
    assert held is not None and held[0] is Gate.UPGRADE_IN_PROGRESS
    assert gates.not_allowed(OptIn.ENABLED, Mode.ENFORCE, scale_set()) is None


def test_only_a_rolling_upgrade_still_rolling_forward_holds():
    assert gates.rolling_upgrade(scale_set(), None) is None
    assert gates.rolling_upgrade(scale_set(), RollingUpgrade("Completed")) is None
    held = gates.rolling_upgrade(scale_set(), RollingUpgrade("RollingForward", NOW, 3, 1))
    assert held is not None and held[0] is Gate.UPGRADE_IN_PROGRESS
    assert "1 VM(s) in progress, 3 pending" in held[1]
