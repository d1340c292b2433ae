"""Figure 5: what one timer tick costs when 1,000 scale sets are balanced and nothing changes.

The app runs in this process (the real timer handler of `function_app.py`, the Reconciler,
the Compute adapter, the Store on Azurite); armsim runs in its own process so that the CPU time
measured here is the app's. The first audit (every scale set new to the store) is the
baseline; the steady-state tick is the next audit, an audit interval later, with nothing
changed; an ordinary tick between audits is shown in the detail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bench.common import (
    Figure,
    RequestCounter,
    armsim_process,
    fleet_document,
    mixed_fleet,
)
from devkit.tables import create_tables


@dataclass(frozen=True, slots=True)
class Tick:
    table_reads: int
    table_writes: int
    arm_requests: int
    cpu_seconds: float
    real_seconds: float


def _wire(info: dict[str, Any], store: Any, clock: Any) -> tuple[Any, Any]:
    """The app's runtime on armsim in its own process: (Compute adapter, runtime)."""
    from armsim import SimCredential
    from armsim.scenario import DEFAULT_TENANT
    from rebalancer.clock import VirtualTime
    from rebalancer.compute import ArmConfig, ComputeAdapter
    from rebalancer.service import build_runtime
    from rebalancer.settings import load_settings

    settings = load_settings(
        {
            "REBALANCER_SUBSCRIPTION_ID": info["subscription_id"],
            "REBALANCER_MODE": "enforce",
            "REBALANCER_APP_PRINCIPAL_ID": info["app_principal_id"],
            "REBALANCER_ARM_ENDPOINT": info["endpoint"],
        }
    )
    config = ArmConfig.from_settings(
        settings,
        ca_cert=info["ca_cert"],
        credential_scopes=("https://management.azure.com/.default",),
    )
    credential = SimCredential(info["app_principal_id"], info.get("tenant_id") or DEFAULT_TENANT)
    compute = ComputeAdapter(config, credential=credential, clock=VirtualTime(clock))
    return compute, build_runtime(settings, store=store, compute=compute, clock=compute.clock)


def _tick(host: Any, store: Any, counter: RequestCounter) -> Tick:
    before, requests = store.stats, counter.count
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
    )


def measure(
    store_factory: Callable[[], Any], *, scale_sets: int = 1000, vms: int = 6
) -> tuple[Tick, Tick, Tick]:
    """(first audit, the next audit with nothing changed, an ordinary tick between audits)."""
    from armsim.clock import VirtualClock
    from devkit.host import Host

    fleet = mixed_fleet(scale_sets, vms, tags={"zone-rebalance": "enabled"})
    with armsim_process(fleet_document(fleet)) as info:
        store = store_factory()
        create_tables(store)
        clock = VirtualClock()
        compute, runtime = _wire(info, store, clock)
        host = Host(runtime)
        try:
            with RequestCounter(info["endpoint"]) as counter:
                first = _tick(host, store, counter)
                clock.advance(timedelta(minutes=5).total_seconds())
                between = _tick(host, store, counter)
                clock.advance(timedelta(minutes=60).total_seconds())
                steady = _tick(host, store, counter)
        finally:
            compute.close()
    return first, steady, between


def figures(first: Tick, steady: Tick, between: Tick, *, scale_sets: int, vms: int) -> list[Figure]:
    fleet = f"{scale_sets} balanced sets x {vms} VMs"
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
            round(steady.cpu_seconds, 2),
            "s",
            round(first.cpu_seconds, 2),
            "<=2.5s",
            steady.cpu_seconds <= 2.5,
            detail=(
                f"app process only ({steady.real_seconds:.1f} s elapsed); a tick between "
                f"audits: {between.cpu_seconds:.3f} s CPU"
            ),
            baseline_label="first audit",
        ),
    ]


def run(store_factory: Callable[[], Any], *, scale_sets: int = 1000, vms: int = 6) -> list[Figure]:
    first, steady, between = measure(store_factory, scale_sets=scale_sets, vms=vms)
    return figures(first, steady, between, scale_sets=scale_sets, vms=vms)
