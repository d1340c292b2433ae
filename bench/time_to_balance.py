"""Figure 2: time to balance, in virtual time, for reference scenarios.

Each scenario runs the whole app as Azure would: armsim (virtual clock) and Azurite, the
function app's own handlers from `function_app.py`, the timer every `tick` seconds and every
Event Grid event armsim emits delivered to the event handler. Time moves in small steps; the
run ends when the scale set is balanced and no operation is in flight.

The lower bound is `ceil(moves / maxSurge) x (create + health + delete)` (plus the time a zone
has no capacity); the goal is to stay within 1.1x of it plus one timer tick per step. The
platform's documented pace (one VM per operation, 12 hours apart) is the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from armsim import ArmSim, ScaleSetSpec, Scenario, VmOverride, ZoneCapacity
from bench.common import (
    Figure,
    VirtualFollowUps,
    install_app,
    resource_share_used,
)

GOAL_RATIO = 1.2
"""Time to balance within this factor of the lower bound."""
SHARE_GOAL = 0.2
"""At most the app's default share (`REBALANCER_ARM_BUDGET_SHARE`) of any policy."""
PLATFORM_INTERVAL = 12 * 3600.0
"""The platform's documented pace: at most one rebalance per 12 hours."""
LOCATION, SKU = "westeurope", "Standard_D2s_v5"


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    counts: dict[str, int]
    surge: int = 1
    mode: str = "Uniform"
    deallocated_in_zone3: int = 0
    short_zone: str | None = None
    short_for: float = 0.0
    """Seconds the zone has no capacity from the start."""
    env: tuple[tuple[str, str], ...] = ()
    """App settings besides the defaults (`REBALANCER_` left out), e.g. the audit interval."""


CASES: tuple[Case, ...] = (
    Case("1-3-3", {"1": 1, "2": 3, "3": 3}),
    Case("1-3-3-flexible", {"1": 1, "2": 3, "3": 3}, mode="Flexible"),
    Case("0-10-10", {"1": 0, "2": 10, "3": 10}),
    Case("2-4-7-deallocated", {"1": 2, "2": 4, "3": 7}, deallocated_in_zone3=2),
    Case("10-30-50-surge1", {"1": 10, "2": 30, "3": 50}, surge=1),
    Case("10-30-50-surge5", {"1": 10, "2": 30, "3": 50}, surge=5),
    Case("0-4-4-zone1-short-1h", {"1": 0, "2": 4, "3": 4}, short_zone="1", short_for=3600.0),
    # Not a reference scenario: shows how much of 0-10-10 is the wait for the next audit.
    Case("0-10-10-audit-5min", {"1": 0, "2": 10, "3": 10}, env=(("audit_interval_minutes", "5"),)),
)
SMALL_CASES: tuple[Case, ...] = (CASES[0],)


def minimum_moves(counts: dict[str, int]) -> int:
    """Fewest VMs to move so that zones differ by at most one: the target gives the larger
    shares to the fullest zones, and every VM above its zone's target moves once."""
    total, zones = sum(counts.values()), len(counts)
    base, extra = divmod(total, zones)
    ordered = sorted(counts.values(), reverse=True)
    targets = [base + 1 if i < extra else base for i in range(zones)]
    return sum(max(0, have - want) for have, want in zip(ordered, targets, strict=True))


@dataclass
class BalanceRun:
    case: Case
    seconds: float | None
    """Virtual seconds until balanced with nothing in flight; None: not within the limit."""
    ticks: int
    events: int
    moved: int
    created: int
    minimum: int
    surge_vm_seconds: float
    step_seconds: float
    tick: float
    final_counts: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    """ARM GETs the app sent (lists, instance views, status polls) until balanced."""
    follow_ups: int = 0
    """Follow-up messages handled."""
    share: float = 0.0
    """Largest share of any Compute or ARM policy's allowance (per scale set or per
    subscription) the app used over the run."""
    share_policy: str = ""
    baseline: BalanceRun | None = None
    """The same case without follow-ups (timer and events only), run alongside."""

    @property
    def reads_per_move(self) -> float | None:
        return self.reads / self.moved if self.moved else None

    @property
    def steps(self) -> int:
        return math.ceil(self.minimum / self.case.surge)

    @property
    def lower_bound(self) -> float:
        return self.case.short_for + self.steps * self.step_seconds

    @property
    def goal_seconds(self) -> float:
        return GOAL_RATIO * self.lower_bound

    @property
    def platform_seconds(self) -> float:
        if self.minimum == 0:
            return 0.0
        return self.case.short_for + (self.minimum - 1) * PLATFORM_INTERVAL + self.step_seconds

    @property
    def platform_surge_vm_seconds(self) -> float:
        """One extra VM from its creation until the source is gone, per move."""
        return self.minimum * self.step_seconds


def _scenario(case: Case) -> Scenario:
    overrides = ()
    if case.deallocated_in_zone3:
        overrides = (
            VmOverride(zone="3", count=case.deallocated_in_zone3, power_state="deallocated"),
        )
    capacity = ()
    if case.short_zone:
        capacity = (ZoneCapacity(LOCATION, SKU, case.short_zone, 0),)
    spec = ScaleSetSpec(
        "web",
        "rg-web",
        location=LOCATION,
        sku=SKU,
        mode=case.mode,
        counts=case.counts,
        tags={"zone-rebalance": "enabled"},
        overrides=overrides,
    )
    return Scenario(scale_sets=(spec,), capacity=capacity)


def _balanced(counts: dict[str, int]) -> bool:
    return max(counts.values()) - min(counts.values()) <= 1


def drive(
    case: Case,
    store_factory: Callable[[], Any],
    *,
    tick: float = 300.0,
    step: float = 10.0,
    limit: float = 3 * 24 * 3600.0,
    follow_ups: bool = True,
) -> BalanceRun:
    """Run the app on one scenario until balanced (or `limit` virtual seconds).

    `follow_ups=False` runs the app without its follow-up queue (timer ticks and events
    only), as it ran before follow-ups: the baseline of the reads per move."""
    scenario = _scenario(case)
    timings = scenario.timings
    with ArmSim.start(scenario) as sim:
        store = store_factory()
        queue = VirtualFollowUps() if follow_ups else None
        app = install_app(sim, store, follow_ups=queue, max_surge=str(case.surge), **dict(case.env))
        try:
            events: list[dict[str, Any]] = []
            sim.on_event = events.append
            original = {vm.instance_id for vm in sim.scale_set("rg-web", "web").vms}
            seen = set(original)
            start_count = len(original)
            started = sim.clock.now()
            ticks, delivered, surge, invocations = 0, 0, 0.0, 0
            restored = case.short_zone is None
            app.host.timer()
            ticks += 1
            finished: float | None = None

            def elapsed() -> float:
                return (sim.clock.now() - started).total_seconds()

            while elapsed() <= limit:
                while True:
                    due = queue.take_due(sim.clock.now()) if queue is not None else []
                    if not events and not due:
                        break
                    while events:
                        delivered += 1
                        app.host.event(events.pop(0))
                    for body in due:
                        invocations += 1
                        app.host.follow_up(body)
                view = sim.scale_set("rg-web", "web")
                seen.update(vm.instance_id for vm in view.vms)
                if _balanced(view.zone_counts()) and not store.active_operations():
                    finished = elapsed()
                    break
                # Nothing in flight and nothing queued: nothing happens before the next tick
                # (or the zone's recovery), so jump there instead of stepping.
                now = elapsed()
                next_tick = ticks * tick
                jump = min(step, next_tick - now)
                if not store.active_operations():
                    jump = next_tick - now
                    if not restored:
                        jump = min(jump, max(step, case.short_for - now))
                upcoming = queue.next_due() if queue is not None else None
                if upcoming is not None:
                    jump = min(jump, max(0.0, (upcoming - started).total_seconds() - now))
                surge += max(0, len(view.vms) - start_count) * jump
                sim.advance(jump)
                if not restored and elapsed() >= case.short_for:
                    sim.actor.set_zone_room(LOCATION, SKU, case.short_zone, None)
                    restored = True
                if elapsed() >= next_tick:
                    app.host.timer()
                    ticks += 1
            final = sim.scale_set("rg-web", "web")
            present = {vm.instance_id for vm in final.vms}
            seconds = finished if finished is not None else elapsed()
            share, policy = resource_share_used(sim.requests, seconds)
            return BalanceRun(
                case=case,
                seconds=finished,
                ticks=ticks,
                events=delivered,
                moved=len(original - present),
                created=len(seen - original),
                minimum=minimum_moves(case.counts),
                surge_vm_seconds=surge,
                step_seconds=timings.create + timings.health + timings.delete,
                tick=tick,
                final_counts=final.zone_counts(),
                reads=sum(1 for r in sim.requests if r.method == "GET"),
                follow_ups=invocations,
                share=share,
                share_policy=policy,
            )
        finally:
            app.close()


def figures(runs: list[BalanceRun]) -> list[Figure]:
    result = []
    for run in runs:
        seconds = run.seconds
        met = seconds is not None and seconds <= run.goal_seconds
        result.append(
            Figure(
                f"time_to_balance.{run.case.name}",
                round(seconds) if seconds is not None else None,
                "s",
                round(run.platform_seconds),
                f"<={run.goal_seconds:.0f}s",
                met,
                detail=(
                    f"lower bound {run.lower_bound:.0f} s ({run.steps} step(s) of "
                    f"{run.step_seconds:.0f} s, maxSurge {run.case.surge}"
                    + (f", zone short for {run.case.short_for:.0f} s" if run.case.short_for else "")
                    + f"); {run.ticks} timer ticks of {run.tick:.0f} s, {run.events} events, "
                    f"{run.follow_ups} follow-ups; ends {run.final_counts}" + _without(run)
                ),
                baseline_label="platform pace (1 VM / 12 h)",
            )
        )
        base = run.baseline
        result.append(
            Figure(
                f"time_to_balance.reads_per_move.{run.case.name}",
                _round(run.reads_per_move),
                "GETs",
                _round(base.reads_per_move) if base is not None else None,
                "report",
                None,
                detail=(
                    f"{run.reads} ARM GETs for {run.moved} move(s) (lists, instance views, "
                    "status polls); baseline: the same case on timer ticks and events only"
                ),
                baseline_label="timer and events only",
            )
        )
        result.append(
            Figure(
                f"time_to_balance.budget_share.{run.case.name}",
                round(run.share, 3),
                "share",
                round(base.share, 3) if base is not None else None,
                f"<={SHARE_GOAL}",
                run.share <= SHARE_GOAL,
                detail=(
                    f"largest share of a policy's allowance (burst + refill over the run), per "
                    f"scale set or per subscription: {run.share_policy}"
                ),
                baseline_label="timer and events only",
            )
        )
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _without(run: BalanceRun) -> str:
    base = run.baseline
    if base is None:
        return ""
    seconds = f"{base.seconds:.0f} s" if base.seconds is not None else "not balanced"
    return f"; without follow-ups {seconds}"


def run(store_factory: Callable[[], Any], cases: tuple[Case, ...] = CASES) -> list[BalanceRun]:
    runs = []
    for case in cases:
        result = drive(case, store_factory)
        result.baseline = drive(case, store_factory, follow_ups=False)
        runs.append(result)
    return runs
