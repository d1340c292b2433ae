"""Figure 1: what a subscription audit costs in ARM requests, time, 429s and throttling budget.

The product (`ComputeAdapter.audit`: one paged inventory list per scale set, bounded
concurrency, the client-side budget) and a naive audit (one GET per VM instance view through
the SDK's own retry policy, retrying without limit) each read a fresh armsim that adds a fixed
latency to every request and enforces Compute-shaped throttling.

Time is measured on armsim's wall clock, where requests take their real time and every wait
(for the budget or a `Retry-After`) is skipped ahead instead of slept: the elapsed time is what
the run would take against Azure, while the benchmark itself takes only the real seconds.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from armsim import ArmSim, Scenario
from armsim.clock import WallClock
from armsim.simulator import ARM_SCOPE
from bench.common import (
    Figure,
    SkipAheadTime,
    budget_floor,
    budget_share_used,
    elapsed,
    mixed_fleet,
    number,
)


@dataclass(frozen=True, slots=True)
class AuditRun:
    """One audit of a simulated subscription and what it cost."""

    scale_sets: int
    vms: int
    requests: int
    by_operation: dict[str, int]
    throttled: int
    seconds: float
    """Elapsed on armsim's clock: real time plus skipped waits (what Azure would take)."""
    real_seconds: float
    cpu_seconds: float
    floor: float
    floor_policy: str
    latency_floor: float
    budget_share: float
    budget_policy: str
    pages: int
    errors: int


def _scenario(scale_sets: int, vms: int, header_style: str = "legacy") -> Scenario:
    """Figure 1 keeps the older header style it was first measured with; figure 8
    (bench/throttling.py) takes the same audit in today's."""
    return Scenario(
        scale_sets=mixed_fleet(scale_sets, vms),
        throttling=True,
        throttle_header_style=header_style,
    )


def _measure(
    sim: ArmSim,
    run: Any,
    *,
    scale_sets: int,
    vms: int,
    share: float,
    latency: float,
    concurrency: int,
) -> AuditRun:
    start, real, cpu = sim.clock.now(), time.perf_counter(), time.process_time()
    errors = run()
    seconds = elapsed(sim.clock, start)
    real, cpu = time.perf_counter() - real, time.process_time() - cpu
    log = sim.requests
    floor, floor_policy = budget_floor(log, share)
    latency_floor = len(log) * latency / concurrency
    used, used_policy = budget_share_used(log, seconds)
    operations = Counter(r.operation for r in log)
    return AuditRun(
        scale_sets=scale_sets,
        vms=vms,
        requests=len(log),
        by_operation=dict(operations),
        throttled=sum(1 for r in log if r.status == 429),
        seconds=seconds,
        real_seconds=real,
        cpu_seconds=cpu,
        floor=max(floor, latency_floor),
        floor_policy=floor_policy if floor >= latency_floor else "latency",
        latency_floor=latency_floor,
        budget_share=used,
        budget_policy=used_policy,
        pages=operations.get("vmss.list_all", 0),
        errors=errors,
    )


def product_audit(
    scale_sets: int,
    vms: int,
    *,
    latency: float,
    share: float = 0.2,
    concurrency: int = 8,
    header_style: str = "legacy",
) -> AuditRun:
    """`ComputeAdapter.audit` over the whole subscription."""
    from rebalancer.compute import ArmConfig, ComputeAdapter
    from rebalancer.compute.errors import AdapterError

    clock = WallClock()
    scenario = _scenario(scale_sets, vms, header_style)
    with ArmSim.start(scenario, clock=clock, latency=latency) as sim:
        config = ArmConfig(
            subscription_id=sim.subscription_id,
            endpoint=sim.endpoint,
            ca_cert=sim.ca_cert_path,
            credential_scopes=(ARM_SCOPE,),
            budget_share=share,
            audit_concurrency=concurrency,
        )
        with ComputeAdapter(config, credential=sim.credential, clock=SkipAheadTime(clock)) as ad:

            def run() -> int:
                results = ad.audit(None, clock.now())
                if len(results) != scale_sets:
                    raise RuntimeError(f"audit returned {len(results)} of {scale_sets} sets")
                return sum(1 for r in results if isinstance(r, AdapterError))

            return _measure(
                sim,
                run,
                scale_sets=scale_sets,
                vms=vms,
                share=share,
                latency=latency,
                concurrency=concurrency,
            )


def naive_audit(
    scale_sets: int, vms: int, *, latency: float, share: float = 0.2, concurrency: int = 8
) -> AuditRun:
    """The audit one writes first: list the VMs, then GET each VM's instance view, with
    azure-core's RetryPolicy honouring `Retry-After` and never giving up."""
    from azure.core.pipeline.policies import RetryPolicy

    clock = WallClock()
    skip = SkipAheadTime(clock)

    class UnboundedRetry(RetryPolicy):
        def sleep(self, settings: Any, transport: Any, response: Any = None) -> None:
            wait = self.get_retry_after(response) if response is not None else None
            skip.sleep(wait if wait else self.get_backoff_time(settings))

    with ArmSim.start(_scenario(scale_sets, vms), clock=clock, latency=latency) as sim:
        client = sim.compute_client(
            retry_policy=UnboundedRetry(retry_total=1_000_000, retry_backoff_max=120)
        )

        def read(scale_set: Any) -> int:
            group = scale_set.id.split("/")[4]
            views = []
            if scale_set.orchestration_mode == "Uniform":
                for vm in client.virtual_machine_scale_set_vms.list(group, scale_set.name):
                    views.append(
                        client.virtual_machine_scale_set_vms.get_instance_view(
                            group, scale_set.name, vm.instance_id
                        )
                    )
            else:
                wanted = f"'virtualMachineScaleSet/id' eq '{scale_set.id}'"
                for vm in client.virtual_machines.list(group, filter=wanted):
                    views.append(client.virtual_machines.instance_view(group, vm.name))
            return len(views)

        def run() -> int:
            listed = list(client.virtual_machine_scale_sets.list_all())
            with ThreadPoolExecutor(concurrency, thread_name_prefix="naive") as pool:
                read_vms = sum(pool.map(read, listed))
            if read_vms != scale_sets * vms:
                raise RuntimeError(f"naive audit read {read_vms} of {scale_sets * vms} VMs")
            return 0

        try:
            return _measure(
                sim,
                run,
                scale_sets=scale_sets,
                vms=vms,
                share=share,
                latency=latency,
                concurrency=concurrency,
            )
        finally:
            client.close()


def figures(ours: AuditRun, naive: AuditRun, *, share: float = 0.2) -> list[Figure]:
    """The audit figures; the naive run may cover fewer scale sets (scaled per scale set)."""
    scale = ours.scale_sets / naive.scale_sets
    pages_per_set = ours.pages / ours.scale_sets
    per_set = ours.requests / ours.scale_sets
    naive_per_set = naive.requests / naive.scale_sets
    naive_seconds = naive.seconds * scale
    naive_429 = naive.throttled * scale
    sample = (
        f"naive measured on {naive.scale_sets} sets x {naive.vms} VMs, scaled x{scale:g}"
        if scale != 1
        else f"naive measured on the same {naive.scale_sets} sets"
    )
    fleet = f"{ours.scale_sets} sets x {ours.vms} VMs (Uniform and Flexible)"
    return [
        Figure(
            "audit.requests_per_scale_set",
            round(per_set, 3),
            "requests",
            round(naive_per_set, 1),
            f"<={number(2 + pages_per_set)}",
            per_set <= 2 + pages_per_set,
            detail=(
                f"{fleet}: {ours.requests} requests "
                + ", ".join(f"{k} {v}" for k, v in sorted(ours.by_operation.items()))
                + f"; naive {naive.requests} for {naive.scale_sets} sets"
            ),
            baseline_label="naive audit",
        ),
        Figure(
            "audit.wall_time",
            round(ours.seconds, 1),
            "s",
            round(ours.floor, 1),
            "<=1.3x_floor",
            ours.seconds <= 1.3 * ours.floor,
            detail=(
                f"floor max(requests x latency / concurrency = {ours.latency_floor:.1f} s, "
                f"budget {ours.floor_policy}); {ours.real_seconds:.1f} s real here "
                f"({ours.cpu_seconds:.1f} s CPU for armsim and client together), the rest "
                "budget waits skipped on armsim's clock"
            ),
            baseline_label="floor",
        ),
        Figure(
            "audit.wall_time_vs_naive",
            round(ours.seconds, 1),
            "s",
            round(naive_seconds, 1),
            "contrast",
            None,
            detail=f"{sample}: {naive.seconds:.1f} s on armsim's clock",
            baseline_label="naive audit",
        ),
        Figure(
            "audit.throttled_responses",
            ours.throttled,
            "429s",
            round(naive_429),
            "0",
            ours.throttled == 0,
            detail=f"{sample}: {naive.throttled} 429s",
            baseline_label="naive audit",
        ),
        Figure(
            "audit.budget_share",
            round(ours.budget_share, 3),
            "share",
            round(naive.budget_share, 3),
            f"<={share:g}",
            ours.budget_share <= share + 1e-9,
            detail=(
                f"most-used policy {ours.budget_policy} (allowance = burst + refill over the "
                f"run); naive: {naive.budget_policy}"
            ),
            baseline_label="naive audit",
        ),
    ]


def run(
    *,
    scale_sets: int = 1000,
    vms: int = 50,
    naive_scale_sets: int = 200,
    latency: float = 0.02,
    share: float = 0.2,
) -> list[Figure]:
    ours = product_audit(scale_sets, vms, latency=latency, share=share)
    if ours.errors:
        raise RuntimeError(f"the audit failed for {ours.errors} scale sets")
    naive = naive_audit(min(naive_scale_sets, scale_sets), vms, latency=latency, share=share)
    return figures(ours, naive, share=share)


def describe(run: AuditRun) -> str:
    return (
        f"{run.scale_sets}x{run.vms}: {run.requests} requests, {run.throttled} 429s, "
        f"{number(run.seconds)} s ({number(run.real_seconds)} s real), "
        f"{math.ceil(run.budget_share * 100)}% of {run.budget_policy}"
    )
