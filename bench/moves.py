"""Figure 3: VMs moved against the minimum, and the extra VM-minutes of surge capacity.

Computed from the time-to-balance runs (`bench.time_to_balance`): a VM moved is one of the
scale set's original VMs that is gone at the end; the minimum is computed independently of the
evaluator (`minimum_moves`). Surge is every VM above the starting count, for as long as it
exists (creating, waiting for health, or being deleted), against the platform's one extra VM
for the length of one step per move.
"""

from __future__ import annotations

from bench.common import Figure
from bench.time_to_balance import BalanceRun


def figures(runs: list[BalanceRun]) -> list[Figure]:
    result = []
    for run in runs:
        name = run.case.name
        result.append(
            Figure(
                f"moves.{name}",
                run.moved,
                "VMs",
                run.minimum,
                f"={run.minimum}",
                run.moved == run.minimum,
                detail=(
                    f"{run.created} VM(s) created, {run.created - run.moved} of them rolled "
                    "back or extra"
                ),
                baseline_label="minimum moves",
            )
        )
        result.append(
            Figure(
                f"moves.surge_vm_minutes.{name}",
                round(run.surge_vm_seconds / 60.0, 1),
                "VM-min",
                round(run.platform_surge_vm_seconds / 60.0, 1),
                "report",
                None,
                detail="VMs above the starting count x how long they existed",
                baseline_label="platform: 1 VM per move for one step",
            )
        )
    return result
