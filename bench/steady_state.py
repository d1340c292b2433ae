"""Figure 5: what one timer tick costs when 1,000 scale sets are balanced and nothing changes.

The app runs in this process (the real timer handler of `function_app.py`, the Reconciler,
the Compute adapter, the Store on Azurite); armsim runs in its own process so that the CPU time
measured here is the app's. The first audit (every scale set new to the store) is the
baseline; the steady-state tick is the next audit, an audit interval later, with nothing
changed; an ordinary tick between audits is shown in the detail.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bench.common import (
    Figure,
    RequestCounter,
    WorkerLogHandler,
    armsim_process,
    fleet_document,
    mixed_fleet,
    worker_logging,
)


@dataclass(frozen=True, slots=True)
class Tick:
    table_reads: int
    table_writes: int
    arm_requests: int
    cpu_seconds: float
    real_seconds: float
    log_records: int


def _tick(host: Any, store: Any, counter: RequestCounter, logs: WorkerLogHandler) -> Tick:
    before, requests, records = store.stats, counter.count, logs.count
    cpu, real = time.process_time(), time.perf_counter()
    host.timer()
    cpu, real = time.process_time() - cpu, time.perf_counter() - real
    after = store.stats
    return Tick(
        table_reads=after.reads - before.reads,
        table_writes=after.writes - before.writes,
        arm_requests=counter.count - requests,
        cpu_seconds=cpu,
        real_seconds=real,
        log_records=logs.count - records,
    )


@dataclass(frozen=True, slots=True)
class Measured:
    first: Tick
    """The first audit: every scale set new to the store."""
    steady: tuple[Tick, ...]
    """The next audits, an audit interval apart, nothing changed."""
    sdk: tuple[Tick, ...]
    """The same audits with the VM lists read through the SDK's models (alternating)."""
    between: Tick
    """An ordinary tick between audits."""


def _median_cpu(ticks: tuple[Tick, ...]) -> float:
    return statistics.median(t.cpu_seconds for t in ticks)


@contextmanager
def sdk_model_reads(compute: Any) -> Iterator[None]:
    """The adapter reading VM lists as before the JSON reads (figure 9's baseline): through
    azure-mgmt-compute's models and `as_dict()`, on the same pipeline and budget."""
    from bench.read_cpu import sdk_instances
    from rebalancer.model import OrchestrationMode

    compute.client  # built (and the SDK imported) before anything is timed  # noqa: B018
    compute._uniform_instances = lambda ref: sdk_instances(compute, ref, OrchestrationMode.UNIFORM)
    compute._flexible_instances = lambda ref: sdk_instances(
        compute, ref, OrchestrationMode.FLEXIBLE
    )
    try:
        yield
    finally:
        del compute._uniform_instances, compute._flexible_instances


def measure(
    store_factory: Callable[[], Any], *, scale_sets: int = 1000, vms: int = 6, rounds: int = 2
) -> Measured:
    """The first audit, an ordinary tick, then `rounds` steady audits alternating between the
    product's reads and the SDK models' (each an audit interval after the one before)."""
    from armsim.clock import VirtualClock
    from bench.wiring import wire
    from devkit.host import Host
    from devkit.tables import create_tables

    fleet = mixed_fleet(scale_sets, vms, tags={"zone-rebalance": "enabled"})
    audit_interval = timedelta(minutes=60).total_seconds()
    with armsim_process(fleet_document(fleet)) as info:
        store = store_factory()
        create_tables(store)
        clock = VirtualClock()
        compute, runtime = wire(info, store, clock)
        host = Host(runtime)
        steady, sdk = [], []
        try:
            with RequestCounter(info["endpoint"]) as counter, worker_logging() as logs:
                first = _tick(host, store, counter, logs)
                clock.advance(timedelta(minutes=5).total_seconds())
                between = _tick(host, store, counter, logs)
                for _ in range(rounds):
                    clock.advance(audit_interval)
                    steady.append(_tick(host, store, counter, logs))
                    with sdk_model_reads(compute):
                        clock.advance(audit_interval)
                        sdk.append(_tick(host, store, counter, logs))
        finally:
            compute.close()
    return Measured(first, tuple(steady), tuple(sdk), between)


GOAL_SECONDS = 2.5
REFERENCE_SDK_SECONDS = 8.63
"""The steady tick on the machine where the 2.5 s goal was set (issue #19), reading the VM
lists through the SDK's models: the goal is that share of the same tick read that way."""


def figures(measured: Measured, *, scale_sets: int, vms: int) -> list[Figure]:
    first, between = measured.first, measured.between
    steady = measured.steady[-1]  # counts are the same in every round
    fleet = f"{scale_sets} balanced sets x {vms} VMs"
    cpu, sdk = _median_cpu(measured.steady), _median_cpu(measured.sdk)
    share = GOAL_SECONDS / REFERENCE_SDK_SECONDS
    return [
        Figure(
            "steady_state.table_writes",
            steady.table_writes,
            "writes",
            first.table_writes,
            "0",
            steady.table_writes == 0,
            detail=f"{fleet}; baseline: the first audit (every set new to the store)",
            baseline_label="first audit",
        ),
        Figure(
            "steady_state.table_reads",
            steady.table_reads,
            "reads",
            first.table_reads,
            "report",
            None,
            detail=(
                f"{steady.table_reads / scale_sets:.2f} per scale set; a tick between audits: "
                f"{between.table_reads} reads, {between.table_writes} writes"
            ),
            baseline_label="first audit",
        ),
        Figure(
            "steady_state.arm_requests",
            steady.arm_requests,
            "requests",
            first.arm_requests,
            "report",
            None,
            detail=(
                f"{steady.arm_requests / scale_sets:.2f} per scale set; a tick between "
                f"audits: {between.arm_requests}"
            ),
            baseline_label="first audit",
        ),
        Figure(
            "steady_state.cpu_time",
            round(cpu, 2),
            "s",
            round(sdk, 2),
            f"<={share:.2f}x",
            cpu <= share * sdk,
            detail=(
                f"app process only, median of {len(measured.steady)} ticks "
                f"({', '.join(f'{t.cpu_seconds:.2f}' for t in measured.steady)} s; "
                f"{steady.real_seconds:.1f} s elapsed), logging as the Functions worker does "
                f"({steady.log_records} records); baseline: the same tick with the VM lists "
                f"read through azure-mgmt-compute's models "
                f"({', '.join(f'{t.cpu_seconds:.2f}' for t in measured.sdk)} s), alternating. "
                f"Goal <= {GOAL_SECONDS:g} s where that took {REFERENCE_SDK_SECONDS:g} s: at "
                f"most {share:.2f}x of it on any machine. First audit {first.cpu_seconds:.2f} s; "
                f"a tick between audits {between.cpu_seconds:.3f} s"
            ),
            baseline_label="SDK models",
        ),
    ]


def run(store_factory: Callable[[], Any], *, scale_sets: int = 1000, vms: int = 6) -> list[Figure]:
    return figures(
        measure(store_factory, scale_sets=scale_sets, vms=vms), scale_sets=scale_sets, vms=vms
    )
