"""Figure 6: peak memory (RSS) of the audit of 50,000 VMs (1,000 scale sets x 50).

The audit runs in a fresh child process (`python -m bench.memory child`): the Compute adapter
reads every scale set of an armsim that runs in a process of its own, and the child reports
its peak RSS (`resource.getrusage`, checked against the kernel's `VmHWM`). The baseline is the
same child that only imports and builds the adapter: what any audit pays before it reads
anything.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Figure, armsim_process, fleet_document, mixed_fleet

ROOT = Path(__file__).resolve().parent.parent


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB.

    `getrusage` keeps `ru_maxrss` across `execve` on Linux, so a child started by a large
    parent reports at least the parent's peak; `VmHWM` in /proc/self/status belongs to the
    child's own address space. Both are read; the smaller is this process's own peak.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return min(peak, int(line.split()[1]) / 1024.0)
    except (OSError, ValueError, IndexError):
        pass
    return peak


def child(info: dict[str, Any], audit: bool) -> dict[str, Any]:
    """Build the adapter (and audit when asked); report peak RSS and what was read."""
    from armsim import SimCredential
    from armsim.clock import VirtualClock
    from armsim.scenario import DEFAULT_TENANT
    from rebalancer.clock import VirtualTime
    from rebalancer.compute import ArmConfig, ComputeAdapter
    from rebalancer.compute.errors import AdapterError

    config = ArmConfig(
        subscription_id=info["subscription_id"],
        endpoint=info["endpoint"],
        ca_cert=info["ca_cert"],
        credential_scopes=("https://management.azure.com/.default",),
    )
    clock = VirtualClock()  # the budget's waits are skipped: memory, not time, is measured
    credential = SimCredential(info["app_principal_id"], DEFAULT_TENANT)
    scale_sets = vms = errors = 0
    started = time.perf_counter()
    with ComputeAdapter(config, credential=credential, clock=VirtualTime(clock)) as adapter:
        _ = adapter.reader  # what an audit uses: the SDK client only comes with a write
        if audit:
            for item in adapter.audit(None, clock.now()):
                if isinstance(item, AdapterError):
                    errors += 1
                else:
                    scale_sets += 1
                    vms += len(item.instances)
    return {
        "rss_mb": _peak_rss_mb(),
        "scale_sets": scale_sets,
        "vms": vms,
        "errors": errors,
        "seconds": time.perf_counter() - started,
    }


def _run_child(info: dict[str, Any], audit: bool, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.memory", "child", json.dumps(info)]
    if audit:
        command.append("--audit")
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(*, scale_sets: int = 1000, vms: int = 50, timeout: float = 300.0) -> list[Figure]:
    with armsim_process(fleet_document(mixed_fleet(scale_sets, vms))) as info:
        idle = _run_child(info, audit=False, timeout=timeout)
        audited = _run_child(info, audit=True, timeout=timeout)
    if audited["errors"] or audited["vms"] != scale_sets * vms:
        raise RuntimeError(f"the memory audit read {audited} of {scale_sets * vms} VMs")
    return [
        Figure(
            "memory.audit_peak_rss",
            round(audited["rss_mb"], 1),
            "MB",
            round(idle["rss_mb"], 1),
            "<300MB",
            audited["rss_mb"] < 300,
            detail=(
                f"{audited['vms']} VMs in {audited['scale_sets']} sets read in "
                f"{audited['seconds']:.1f} s; baseline: the same process before the audit"
            ),
            baseline_label="adapter built, nothing read",
        )
    ]


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "child":
        print(json.dumps(child(json.loads(argv[1]), audit="--audit" in argv[2:])))
        return 0
    for figure in run():
        print(figure.line())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
