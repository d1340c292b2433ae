"""The gates: why a move the evaluator planned does not start now, each as a pure function.

Each takes the facts it needs (settings, what the store remembers, what Azure answered) and
returns the gate with its explanation, or None when it does not hold the move. The reconciler
reads those facts lazily, cheapest first, and stops at the first gate that holds
(`Reconciler._gate`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from rebalancer.evaluator import Assessment
from rebalancer.model import Inventory, RollingUpgrade, ScaleSet
from rebalancer.settings import Mode, OptIn
from rebalancer.verdict import Gate

if TYPE_CHECKING:
    from rebalancer import operation as op
    from rebalancer.compute.quota import Quota

Held = tuple[Gate, str]


def opted_out(opt_in: OptIn) -> Held | None:
    if opt_in is OptIn.DISABLED:
        return Gate.OPTED_OUT, "tag zone-rebalance=disabled: not even reported as actionable"
    return None


def not_allowed(opt_in: OptIn, mode: Mode, scale_set: ScaleSet) -> Held | None:
    """The opt-in, the app's mode, and someone else's update of the scale set."""
    if opt_in is not OptIn.ENABLED:
        return Gate.NOT_OPTED_IN, (
            "audited only: tag the scale set zone-rebalance=enabled to let the app move VMs"
        )
    if mode is Mode.OFF:
        return Gate.MODE_OFF, "REBALANCER_MODE=off"
    if mode is Mode.AUDIT:
        return Gate.MODE_AUDIT, "REBALANCER_MODE=audit: set it to enforce to move VMs"
    if scale_set.provisioning_state.lower() == "updating":
        return Gate.UPGRADE_IN_PROGRESS, (
            "the scale set's provisioningState is Updating (a model change or upgrade by "
            "someone else); the move waits until it is Succeeded"
        )
    return None


def silent_change(
    before: Collection[str],
    current: Collection[str],
    ours: Collection[str],
    assessed_at: datetime,
    cooldown: timedelta,
    now: datetime,
) -> Held | None:
    """VMs gone or new since the assessment at `assessed_at` (`before`: its VM ids), other
    than the app's own (`ours`). Repairs, upgrades, evictions and overprovisioning emit no
    Event Grid event: such a change starts the cooldown as an event would."""
    gone = sorted(set(before) - set(current) - set(ours))
    new = sorted(set(current) - set(before) - set(ours))
    if not gone and not new:
        return None
    seen = "; ".join(
        part
        for part in (
            f"gone: {', '.join(gone)}" if gone else "",
            f"new: {', '.join(new)}" if new else "",
        )
        if part
    )
    return Gate.COOLDOWN, (
        f"VMs changed since the assessment at {assessed_at.isoformat()} ({seen}), not by the "
        "app nor by an event it saw (repairs, upgrades, evictions emit none); moves wait "
        f"until {(now + cooldown).isoformat()} (REBALANCER_COOLDOWN_MINUTES)"
    )


def apps_vms(records: Iterable[op.OperationRecord]) -> set[str]:
    """VMs the given operations of the app created, discarded, moved or asked to delete."""
    ours: set[str] = set()
    for record in records:
        ours |= set(record.created) | set(record.discarded) | set(record.sources)
        ours |= set(record.delete_requested)
    return ours


def cooldown(last_activity: datetime | None, period: timedelta, now: datetime) -> Held | None:
    if last_activity is None or last_activity + period <= now:
        return None
    return Gate.COOLDOWN, (
        f"outside change at {last_activity.isoformat()}; moves wait until "
        f"{(last_activity + period).isoformat()} (REBALANCER_COOLDOWN_MINUTES)"
    )


def min_interval(last_ended: datetime | None, interval: timedelta, now: datetime) -> Held | None:
    if last_ended is None or last_ended + interval <= now:
        return None
    return Gate.MIN_INTERVAL, (
        f"the last operation ended at {last_ended.isoformat()}; next move "
        f"after {(last_ended + interval).isoformat()} (REBALANCER_MIN_MOVE_INTERVAL_MINUTES)"
    )


def repeat(
    last: op.OperationRecord,
    ended: datetime,
    inventory: Inventory,
    assessment: Assessment,
    period: timedelta,
    now: datetime,
) -> Held | None:
    """Why the planned move would only repeat how the last operation (`last`, finished at
    `ended`) ended, or None.

    Both apply while the scale set still holds exactly the VMs the last operation started
    from and the plan names the same zones:
    - `placement_tie`: Azure placed its VM in a zone tied with the planned one on VM
      count and would do so again; the move waits until the scale set's VMs change.
    - `failed_replacement`: its new VMs failed to provision in the wanted zone (an extension,
      not capacity); the move waits one cooldown, so that a broken extension does not
      create and delete a VM on every pass.
    """
    from rebalancer.operation import Reason  # with the first operation, not with every audit

    reasons = {t.reason for t in last.history}
    if not reasons & {Reason.PLACEMENT_TIE, Reason.NEW_VM_FAILED}:
        return None
    targets = {move.to_zone for move in assessment.moves}  # as `op.start` counts them
    current = {instance.id for instance in inventory.instances}
    if current != last.baseline.instance_ids or targets != set(last.zone_needs):
        return None
    if Reason.PLACEMENT_TIE in reasons:
        placed = sorted(set(last.created.values()) - {None})
        where = ", ".join(f"zone {zone}" for zone in placed) or "another zone"
        return Gate.PLACEMENT_TIE, (
            f"operation {last.operation_id} asked for zone(s) "
            f"{', '.join(last.target_zones)} and Azure placed its VM in {where}, which "
            "holds as many VMs; it would do so again. The move waits until the scale "
            "set's VMs change"
        )
    until = ended + period
    if until <= now:
        return None
    return Gate.FAILED_REPLACEMENT, (
        f"the new VMs of operation {last.operation_id} failed to provision in zone(s) "
        f"{', '.join(last.target_zones)} (see its history: an extension, not capacity); "
        f"next try after {until.isoformat()} (REBALANCER_COOLDOWN_MINUTES), or fix the "
        "scale set's extensions first"
    )


def zone_backoff(scale_set: ScaleSet, zone: str, until: datetime | None) -> Held | None:
    if until is None:
        return None
    return Gate.ZONE_BACKOFF, (
        f"zone {zone} of {scale_set.location} had no capacity for "
        f"{scale_set.sku_name}; next try after {until.isoformat()}"
    )


def quota(scale_set: ScaleSet, available: Quota, count: int, *, spot: bool) -> Held | None:
    """Room for `count` new VMs in the quota they draw on (lowPriorityCores for Spot)."""
    if available.headroom_vms >= count:
        return None
    kind = "Spot " if spot else ""
    return Gate.QUOTA, (
        f"{available.family} quota in {scale_set.location}: {available.used_vcpus}/"
        f"{available.limit_vcpus} vCPUs used, {count} more {kind}VM(s) of "
        f"{available.vcpus_per_vm} vCPUs do not fit; raise the quota"
    )


def rolling_upgrade(scale_set: ScaleSet, upgrade: RollingUpgrade | None) -> Held | None:
    """A rolling upgrade (or automatic OS image upgrade) reimaging the set's VMs."""
    if upgrade is None or not upgrade.running:
        return None
    since = f" since {upgrade.started.isoformat()}" if upgrade.started else ""
    return Gate.UPGRADE_IN_PROGRESS, (
        f"a rolling upgrade is {upgrade.status}{since} ({upgrade.in_progress} VM(s) in "
        f"progress, {upgrade.pending} pending; upgradePolicy.mode {scale_set.upgrade_mode}"
        f"{', automatic OS upgrades' if scale_set.automatic_os_upgrade else ''}); the move "
        "waits until rollingUpgrades/latest is no longer RollingForward (or cancel it: "
        "az vmss rolling-upgrade cancel)"
    )
