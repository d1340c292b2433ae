"""Figures 7 and 8: the app against throttling headers as Azure reports them today.

Azure's answers recorded in 2024 and 2025 (tests/data/real-azure/throttling) name Compute's
policies without a window and report `VmssQueuedVMOperations;0` on every write. armsim answers
in that style here (`throttle_header_style = "current"`, its default), with throttling on.

7. **Waits between the app's own writes in a move wave**: 20 opted-in scale sets at 1/3/3 (one
   move each), the whole app (timer and Event Grid handlers, Reconciler, adapter, Store on
   Azurite) on armsim's virtual clock until every set is balanced. The figure is the seconds the
   client budget made capacity changes and deletes wait. Goal: 0 while every Compute bucket is
   above the app's share. The baseline is the same wave, in the same run, with the pause rule
   the budget had before (hold below 80% of the highest value seen, a 60 s refill for names
   without a window, every reported counter taken for a bucket).
8. **The audit of 1,000 x 50 with today's headers**: `audit_cost.product_audit` on a fleet that
   answers in the current style. Goals as for the audit figures: at most 1.3x the budget floor,
   no 429, at most the share of the busiest policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from armsim import ArmSim, ScaleSetSpec, Scenario
from bench.common import Figure, install_app, number
from rebalancer.budget import Budget, CallKind, Reservation, policy_window_seconds

WRITES = frozenset({CallKind.SCALE_SET_UPDATE, CallKind.SCALE_SET_DELETE_INSTANCES})
HEADER_STYLE = "current"


class WaitLog:
    """Wraps a Budget's `reserve` and adds up the waits it hands to writes."""

    def __init__(self, budget: Budget) -> None:
        self.writes = 0
        self.waited = 0.0
        self.longest = 0.0
        reserve = budget.reserve

        def logged(kind: CallKind, now: float, **kwargs: Any) -> Reservation:
            reservation = reserve(kind, now, **kwargs)
            if kind in WRITES and reservation.granted:
                self.writes += 1
                self.waited += reservation.wait
                self.longest = max(self.longest, reservation.wait)
            return reservation

        budget.reserve = logged  # type: ignore[method-assign]


class PreviousRuleBudget(Budget):
    """The budget with the pause rule it had before today's headers were understood: the
    contrast for figure 7, measured in the same run, not used by the app."""

    def observe(
        self,
        kind: CallKind,
        remaining: Mapping[str, int],
        now: float,
        windows: Mapping[str, float] | None = None,
        *,
        resource: str | None = None,
    ) -> float | None:
        hold_until: float | None = None
        for name, left in remaining.items():
            window = (windows or {}).get(name) or policy_window_seconds(name) or 60.0
            seen = self._previous.setdefault(name, [float(max(left, 1)), window])
            seen[0] = max(seen[0], left)
            reserved = (1.0 - self.share) * seen[0]
            if left < reserved:
                until = now + (reserved - left) / (seen[0] / seen[1])
                hold_until = until if hold_until is None else max(hold_until, until)
        if hold_until is not None:
            self.hold(kind, hold_until)
        return hold_until

    def __post_init__(self) -> None:
        super().__post_init__()
        self._previous: dict[str, list[float]] = {}


@dataclass(frozen=True, slots=True)
class WaveRun:
    scale_sets: int
    writes: int
    waited: float
    longest: float
    seconds: float | None
    throttled: int
    balanced: int


def wave(
    store_factory: Callable[[], Any],
    *,
    scale_sets: int = 20,
    budget: Budget | None = None,
    tick: float = 300.0,
    step: float = 10.0,
    limit: float = 6 * 3600.0,
) -> WaveRun:
    """One move per scale set, all at once, until every set is balanced (or `limit`)."""
    specs = tuple(
        ScaleSetSpec(
            f"web{i:02d}",
            "rg-wave",
            counts={"1": 1, "2": 3, "3": 3},
            tags={"zone-rebalance": "enabled"},
        )
        for i in range(scale_sets)
    )
    scenario = Scenario(scale_sets=specs, throttling=True, throttle_header_style=HEADER_STYLE)
    budget = budget or Budget()
    log = WaitLog(budget)
    with ArmSim.start(scenario) as sim:
        store = store_factory()
        app = install_app(
            sim, store, budget=budget, max_concurrent_operations=str(min(100, scale_sets))
        )
        try:
            queue: list[dict[str, Any]] = []
            sim.on_event = queue.append
            start = sim.clock.now()
            elapsed, finished = 0.0, None
            app.host.timer()
            while elapsed <= limit:
                while queue:
                    app.host.event(queue.pop(0))
                views = [sim.scale_set("rg-wave", spec.name) for spec in specs]
                balanced = sum(_balanced(view.zone_counts()) for view in views)
                if balanced == len(specs) and not store.active_operations():
                    finished = (sim.clock.now() - start).total_seconds()
                    break
                jump = step if store.active_operations() else tick - elapsed % tick
                sim.advance(jump)
                elapsed += jump
                if elapsed % tick == 0:
                    app.host.timer()
            throttled = sum(1 for r in sim.requests if r.status == 429)
            return WaveRun(
                scale_sets, log.writes, log.waited, log.longest, finished, throttled, balanced
            )
        finally:
            app.close()


def _balanced(counts: dict[str, int]) -> bool:
    return max(counts.values()) - min(counts.values()) <= 1


def wave_figure(ours: WaveRun, before: WaveRun) -> Figure:
    done = ours.seconds is not None
    return Figure(
        "throttling.wave_write_waits",
        round(ours.waited, 1),
        "s",
        round(before.waited, 1),
        "0_while_buckets_above_share",
        ours.waited == 0 and ours.throttled == 0 and done,
        detail=(
            f"{ours.scale_sets} sets at 1/3/3, headers in today's style: {ours.writes} writes, "
            f"longest wait {number(ours.longest)} s, {ours.throttled} 429s, balanced "
            f"{ours.balanced}/{ours.scale_sets} after {number(ours.seconds)} s; previous rule: "
            f"{before.writes} writes, longest {number(before.longest)} s, balanced "
            f"{before.balanced}/{before.scale_sets} after {number(before.seconds)} s"
        ),
        baseline_label="previous pause rule, same wave",
    )


def audit_figure(run: Any, share: float = 0.2) -> Figure:
    within = run.seconds <= 1.3 * run.floor
    met = within and run.throttled == 0 and run.budget_share <= share + 1e-9
    return Figure(
        "throttling.audit_real_headers",
        round(run.seconds, 1),
        "s",
        round(run.floor, 1),
        f"<=1.3x_floor,0_429s,<={share:g}_share",
        met,
        detail=(
            f"{run.scale_sets} sets x {run.vms} VMs, headers in today's style: "
            f"{run.throttled} 429s, {run.budget_share:.3f} of {run.budget_policy}, "
            f"floor set by {run.floor_policy}, {run.requests} requests"
        ),
        baseline_label="floor",
    )


def run(
    store_factory: Callable[[], Any],
    *,
    wave_sets: int = 20,
    audit_sets: int = 1000,
    audit_vms: int = 50,
    latency: float = 0.02,
) -> list[Figure]:
    from bench import audit_cost

    ours = wave(store_factory, scale_sets=wave_sets)
    before = wave(store_factory, scale_sets=wave_sets, budget=PreviousRuleBudget())
    audit = audit_cost.product_audit(
        audit_sets, audit_vms, latency=latency, header_style=HEADER_STYLE
    )
    if audit.errors:
        raise RuntimeError(f"the audit failed for {audit.errors} scale sets")
    return [wave_figure(ours, before), audit_figure(audit)]
