"""The balance evaluator: is a scale set balanced across its zones, and which moves fix it.

Pure functions over `rebalancer.model` values. The rules (docs/how-it-decides.md):

- Count per configured zone, zones without VMs included. *Total* = every VM that is not
  being deleted and did not fail for lack of capacity (deallocated VMs, and VMs whose
  extensions failed, count); *active* = provisioned and not deallocated or stopped.
- Balanced = the totals differ by at most 1.
- A move goes from the zone with the most VMs to the zone with the fewest, and only while
  the receiving zone has fewer active VMs than the giving zone, so a move never worsens the
  active spread.
- Sources are active, unprotected VMs of the giving zone: unhealthy first, then VMs not on
  the latest model, then the highest instance id (the platform's own scale-in order).

Tie-breaks (deterministic, independent of input order):
- receiving zone: among the zones with the fewest VMs, the one with the fewest active VMs,
  then the first by zone name;
- giving zone: among the zones with the most VMs, only those that still have an eligible
  source and more active VMs than the receiver; of those the one with the most active VMs,
  then the first by zone name. If no zone tied at the maximum qualifies, planning stops:
  moving from a smaller zone cannot reach +/-1 while the largest zone stays as it is.

This module never looks at the opt-in tag, cooldown, app mode or quota: the reconciler
adds those gates on top of `assess`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from rebalancer.model import (
    Health,
    HealthMonitoring,
    Instance,
    Inventory,
    OrchestrationMode,
    ScaleSet,
    ScaleSetRef,
)


@dataclass(frozen=True, slots=True)
class ZoneCount:
    """VMs of one zone: `total` counts active and deallocated; `active` only running ones."""

    total: int
    active: int


@dataclass(frozen=True, slots=True)
class Move:
    """Replace `source` (an `Instance.id` in `from_zone`) with a new VM in `to_zone`."""

    from_zone: str
    to_zone: str
    source: str


class Decision(StrEnum):
    NONE = "none"
    MOVE = "move"
    SKIP = "skip"


class Reason(StrEnum):
    """Why `assess` decided what it did; `describe()` says it to a person."""

    BALANCED = "balanced"
    MOVES_PLANNED = "moves_planned"
    NOT_ZONAL = "not_zonal"
    PLATFORM_REBALANCING = "platform_rebalancing"
    NO_SKU = "no_sku"
    NO_HEALTH_MONITORING = "no_health_monitoring"
    HEALTH_NOT_REPORTED = "health_not_reported"
    SCALE_SET_DELETING = "scale_set_deleting"
    SCALE_SET_NOT_SUCCEEDED = "scale_set_not_succeeded"
    INSTANCES_OUTSIDE_ZONES = "instances_outside_zones"
    NO_ELIGIBLE_SOURCE = "no_eligible_source"
    ACTIVE_SPREAD = "active_spread"
    INSTANCE_MIX = "instance_mix"
    STANDBY_POOL = "standby_pool"
    SPOT_PRIORITY_MIX = "spot_priority_mix"

    @property
    def decision(self) -> Decision:
        if self is Reason.BALANCED:
            return Decision.NONE
        if self is Reason.MOVES_PLANNED:
            return Decision.MOVE
        return Decision.SKIP

    def describe(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: Mapping[Reason, str] = MappingProxyType(
    {
        Reason.BALANCED: "Every zone holds the same number of VMs +/- 1; nothing to do.",
        Reason.MOVES_PLANNED: (
            "The zones are out of balance; the listed moves replace VMs of the fullest zone "
            "with new VMs in the emptiest one, create-before-delete."
        ),
        Reason.NOT_ZONAL: (
            "The scale set spans fewer than 2 availability zones, so there is nothing to "
            "balance. Configure at least 2 zones to use zone rebalancing."
        ),
        Reason.PLATFORM_REBALANCING: (
            "Azure's own automatic zone balance (resiliencyPolicy."
            "automaticZoneRebalancingPolicy) is enabled on this scale set; the rebalancer "
            "reports it and stays out of the way. Disable that policy to let the rebalancer "
            "manage the set instead."
        ),
        Reason.NO_SKU: (
            "The scale set has no SKU, so new VMs cannot be created. Set sku.name on the "
            "scale set model."
        ),
        Reason.NO_HEALTH_MONITORING: (
            "The scale set has no application health monitoring, so a new VM can never be "
            "confirmed healthy before its source is deleted. Add the Application Health "
            "extension (Uniform: or a load balancer health probe)."
        ),
        Reason.HEALTH_NOT_REPORTED: (
            "Health monitoring is configured, but no running VM reports vmHealth in the "
            "instance views the rebalancer reads, so a new VM could never be confirmed healthy "
            "and no VM is known to be unhealthy. Check that the Application Health extension "
            "is installed and reporting on the VMs (a load balancer probe does not always "
            "surface there); the set is assessed again on every audit."
        ),
        Reason.SCALE_SET_DELETING: "The scale set is being deleted; it is left alone.",
        Reason.SCALE_SET_NOT_SUCCEEDED: (
            "The scale set's provisioning state is not Succeeded (an update is running or "
            "failed); wait for it to finish, or fix the failed update, and it is re-assessed."
        ),
        Reason.INSTANCES_OUTSIDE_ZONES: (
            "Some VMs are not in any of the scale set's configured zones (non-zonal VMs, or "
            "a zone that was removed), so zone counts would be misleading. Move or delete "
            "those VMs first."
        ),
        Reason.NO_ELIGIBLE_SOURCE: (
            "The zones are out of balance, but every VM in the fullest zone is protected, "
            "deallocated, stopped, not yet provisioned or being deleted, so none can be "
            "moved. Lift instance protection or start VMs there to allow a move."
        ),
        Reason.INSTANCE_MIX: (
            "The scale set uses instance mix (sku.name Mix, skuProfile.vmSizes): Azure picks "
            "the size of each new VM, so the quota to check and the zone capacity to back off "
            "from are not known before a move; it is reported and left alone. A single VM "
            "size in sku.name lets the rebalancer manage it."
        ),
        Reason.STANDBY_POOL: (
            "VMs of the scale set wait in a standby pool (instanceView.isVMInStandbyPool): "
            "they do not count toward zone balance, and a scale-out takes pool VMs, from "
            "whichever zone they are in, instead of creating VMs where they are needed; it is "
            "reported and left alone. Without an attached standby pool the rebalancer "
            "manages it."
        ),
        Reason.SPOT_PRIORITY_MIX: (
            "The scale set mixes Spot and regular VMs (priorityMixPolicy): a move's new VM gets "
            "the priority the split gives it, and deleting a source of the other priority "
            "would change the split, so no move is planned. A VM of that priority in the "
            "fullest zone that may move, or a changed priorityMixPolicy, lets it move."
        ),
        Reason.ACTIVE_SPREAD: (
            "The zones are out of balance by count, but the emptiest zone already has at "
            "least as many running VMs as the fullest one; a move would worsen the spread "
            "of running VMs, so none is planned. Start or delete the deallocated VMs of the "
            "fullest zone to change that."
        ),
    }
)


@dataclass(frozen=True, slots=True)
class Assessment:
    """What the evaluator concluded about one scale set in one observation.

    `zones` are the counts now; `projected` the counts once every planned move is done.
    `excluded` lists the ids of VMs that do not count (being deleted or never allocated).
    """

    ref: ScaleSetRef
    zones: Mapping[str, ZoneCount]
    balanced: bool
    decision: Decision
    reason: Reason
    detail: str
    moves: tuple[Move, ...]
    excluded: tuple[str, ...]
    projected: Mapping[str, ZoneCount] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def under_provisioned(self) -> tuple[str, ...]:
        """Zones holding the fewest VMs, when the set is out of balance."""
        return _extreme_zones(self.zones, min) if not self.balanced else ()

    @property
    def over_provisioned(self) -> tuple[str, ...]:
        """Zones holding the most VMs, when the set is out of balance."""
        return _extreme_zones(self.zones, max) if not self.balanced else ()


def _extreme_zones(
    counts: Mapping[str, ZoneCount], pick: Callable[[Iterable[int]], int]
) -> tuple[str, ...]:
    if not counts:
        return ()
    target = pick(count.total for count in counts.values())
    return tuple(zone for zone, count in counts.items() if count.total == target)


def zone_key(zone: str) -> tuple[int, int | str]:
    """Zone names in order: numeric names numerically ("2" before "10"), others after."""
    return (0, int(zone)) if zone.isdigit() else (1, zone)


def zone_counts(scale_set: ScaleSet, instances: Iterable[Instance]) -> dict[str, ZoneCount]:
    """Total and active VMs per configured zone, ordered by zone name, empty zones included.

    VMs being deleted or never allocated, and VMs outside the configured zones, are not
    counted.
    """
    zones = sorted(set(scale_set.zones), key=zone_key)
    totals = dict.fromkeys(zones, 0)
    actives = dict.fromkeys(zones, 0)
    for instance in instances:
        if instance.zone in totals and instance.counts:
            totals[instance.zone] += 1
            actives[instance.zone] += int(instance.active)
    return {zone: ZoneCount(totals[zone], actives[zone]) for zone in zones}


def is_balanced(counts: Mapping[str, ZoneCount]) -> bool:
    """Every zone within +/-1 VM (by total) of every other."""
    totals = [count.total for count in counts.values()]
    return not totals or max(totals) - min(totals) <= 1


def is_eligible_source(instance: Instance) -> bool:
    """Could be deleted in a move: active (so not deallocated, stopped, deleting or failed)
    and known not to be protected."""
    return (
        instance.active
        and instance.counts
        and not instance.protected
        and not instance.protection_unknown
    )


def eligible_sources(instances: Iterable[Instance], zone: str) -> tuple[Instance, ...]:
    """The VMs of `zone` that a move may delete, best candidate first.

    Order: VMs observed unhealthy first, then those whose health is not known, then healthy
    ones; within each, VMs not on the latest model first, then the highest instance id
    (numeric ids compared as numbers). An observed-unhealthy source is the one the health
    timeout's rule may delete beside a replacement that never turned healthy.
    """
    candidates = [i for i in instances if i.zone == zone and is_eligible_source(i)]
    candidates.sort(key=Instance.sort_id, reverse=True)
    candidates.sort(
        key=lambda i: (not i.observed_unhealthy, i.health is Health.HEALTHY, i.latest_model)
    )
    return tuple(candidates)


@dataclass(frozen=True, slots=True)
class _Plan:
    moves: tuple[Move, ...]
    projected: dict[str, ZoneCount]
    stopped_by: Reason | None
    """Why planning stopped before reaching +/-1 (None when it reached it)."""
    stop_detail: str = ""


def _plan(scale_set: ScaleSet, instances: Iterable[Instance]) -> _Plan:
    instances = tuple(instances)
    counts = zone_counts(scale_set, instances)
    totals = {zone: count.total for zone, count in counts.items()}
    actives = {zone: count.active for zone, count in counts.items()}
    sources = {zone: list(eligible_sources(instances, zone)) for zone in counts}
    order = {zone: position for position, zone in enumerate(counts)}
    moves: list[Move] = []
    stopped_by: Reason | None = None
    stop_detail = ""
    upcoming = upcoming_spot(scale_set, instances, len(instances))

    while totals and max(totals.values()) - min(totals.values()) > 1:
        fewest = min(totals.values())
        receiver = min(
            (zone for zone, total in totals.items() if total == fewest),
            key=lambda zone: (actives[zone], order[zone]),
        )
        most = max(totals.values())
        tied = [zone for zone, total in totals.items() if total == most]
        givers = [zone for zone in tied if sources[zone] and actives[zone] > actives[receiver]]
        wanted = upcoming[len(moves)] if upcoming is not None else None
        if givers and wanted is not None:
            matching = [z for z in givers if any(i.spot == wanted for i in sources[z])]
            if not matching:
                stopped_by = Reason.SPOT_PRIORITY_MIX
                stop_detail = _split_detail(scale_set, instances, givers, wanted)
                break
            givers = matching
        if not givers:
            # Active rule first: it is the documented reason (7/4/4) even when sources are short.
            if all(actives[zone] <= actives[receiver] for zone in tied):
                stopped_by = Reason.ACTIVE_SPREAD
                fullest = ", ".join(
                    f"zone {zone} ({most} VMs, {actives[zone]} active)" for zone in tied
                )
                stop_detail = (
                    f"fullest: {fullest}; emptiest: zone {receiver} ({fewest} VMs, "
                    f"{actives[receiver]} active)"
                )
            else:
                stopped_by = Reason.NO_ELIGIBLE_SOURCE
                planned = {move.source for move in moves}
                stuck = [zone for zone in tied if actives[zone] > actives[receiver]]
                stop_detail = "; ".join(
                    _unmovable(zone, most, instances, planned) for zone in stuck
                )
            break
        giver = min(givers, key=lambda zone: (-actives[zone], order[zone]))
        source = next(i for i in sources[giver] if wanted is None or i.spot == wanted)
        sources[giver].remove(source)
        moves.append(Move(from_zone=giver, to_zone=receiver, source=source.id))
        totals[giver] -= 1
        actives[giver] -= 1
        totals[receiver] += 1
        actives[receiver] += 1

    projected = {zone: ZoneCount(totals[zone], actives[zone]) for zone in counts}
    return _Plan(tuple(moves), projected, stopped_by, stop_detail)


def upcoming_spot(
    scale_set: ScaleSet, instances: Iterable[Instance], k: int
) -> tuple[bool, ...] | None:
    """Whether each of the next `k` new VMs would be Spot under the scale set's priority mix;
    None when the set has no priority mix (every new VM is like the others)."""
    mix = scale_set.priority_mix
    if mix is None:
        return None
    members = [i for i in instances if i.counts]
    spot = sum(1 for i in members if i.spot)
    return mix.next_spot(len(members) - spot, spot, k)


def split_text(instances: Iterable[Instance]) -> str:
    members = [i for i in instances if i.counts]
    spot = sum(1 for i in members if i.spot)
    return f"{len(members) - spot} regular and {spot} Spot VM(s)"


def _split_detail(
    scale_set: ScaleSet, instances: tuple[Instance, ...], givers: list[str], wanted: bool
) -> str:
    kind, other = ("Spot", "regular") if wanted else ("regular", "Spot")
    mix = scale_set.priority_mix
    policy = mix.describe() if mix is not None else "priorityMixPolicy"
    zones = _zone_list(sorted(givers, key=zone_key))
    return (
        f"the next new VM would be {kind} ({policy}; now {split_text(instances)}), and "
        f"{zones} has no {kind} VM that may move, only {other} ones: deleting one would "
        f"change the split. A {kind} VM there that may move, or a changed priorityMixPolicy, "
        "lets the move go ahead"
    )


def _unmovable(zone: str, total: int, instances: tuple[Instance, ...], planned: set[str]) -> str:
    """Why no VM of `zone` can be a source, by kind."""
    members = [i for i in instances if i.zone == zone and i.counts and i.id not in planned]
    kinds = {
        "protected": sum(1 for i in members if i.active and i.protected),
        "of unread protection": sum(
            1 for i in members if i.active and i.protection_unknown and not i.protected
        ),
        "not running": sum(1 for i in members if not i.active),
    }
    parts = ", ".join(f"{count} {kind}" for kind, count in kinds.items() if count)
    return f"zone {zone} holds the most VMs ({total}) and none can move: {parts}"


def plan_moves(scale_set: ScaleSet, instances: Iterable[Instance]) -> tuple[Move, ...]:
    """The minimum moves reaching +/-1, in order; fewer (or none) when the active rule or a
    lack of eligible sources stops planning early. Each source is used once."""
    return _plan(scale_set, instances).moves


def _zone_list(zones: Iterable[str]) -> str:
    names = [f"zone {zone}" for zone in zones]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _counts_text(counts: Mapping[str, ZoneCount]) -> str:
    return ", ".join(f"{zone}: {c.total} ({c.active} active)" for zone, c in counts.items())


def _ineligibility(scale_set: ScaleSet, instances: tuple[Instance, ...]) -> tuple[Reason, str]:
    """The first rule that makes the scale set ineligible, with a specific detail."""
    if len(set(scale_set.zones)) < 2:
        zones = ", ".join(scale_set.zones) or "none"
        return Reason.NOT_ZONAL, f"configured zones: {zones}"
    if scale_set.platform_rebalancing:
        return Reason.PLATFORM_REBALANCING, "automaticZoneRebalancingPolicy.enabled is true"
    if not scale_set.sku_name:
        return Reason.NO_SKU, "sku.name is empty"
    if scale_set.instance_mix:
        sizes = ", ".join(scale_set.vm_sizes) or "none listed"
        return Reason.INSTANCE_MIX, (
            f"sku.name is {scale_set.sku_name}, skuProfile.vmSizes: {sizes}; set a single "
            "VM size in sku.name to let the rebalancer move VMs"
        )
    monitoring = scale_set.health_monitoring
    if monitoring is HealthMonitoring.NONE:
        return Reason.NO_HEALTH_MONITORING, "no Application Health extension or LB health probe"
    if (
        scale_set.mode is OrchestrationMode.FLEXIBLE
        and monitoring is HealthMonitoring.LOAD_BALANCER_PROBE
    ):
        return (
            Reason.NO_HEALTH_MONITORING,
            "Flexible scale sets report health only through the Application Health extension; "
            "a load balancer probe is not enough",
        )
    state = scale_set.provisioning_state
    if state.lower() == "deleting":
        return Reason.SCALE_SET_DELETING, "provisioningState is Deleting"
    if state.lower() != "succeeded":
        return Reason.SCALE_SET_NOT_SUCCEEDED, f"provisioningState is {state}"
    pooled = sorted((i for i in instances if i.in_standby_pool), key=Instance.sort_id)
    if pooled:
        listed = ", ".join(f"{i.id} (zone {i.zone or 'none'})" for i in pooled[:5])
        more = f" and {len(pooled) - 5} more" if len(pooled) > 5 else ""
        return Reason.STANDBY_POOL, (
            f"{len(pooled)} VM(s) in a standby pool, not counted: {listed}{more}; detach "
            "the standby pool (Microsoft.StandbyPool attachedVirtualMachineScaleSetId) to let "
            "the rebalancer move VMs"
        )
    configured = set(scale_set.zones)
    outside = [i for i in instances if i.counts and i.zone not in configured]
    if outside:
        listed = ", ".join(f"{i.id} (zone {i.zone or 'none'})" for i in outside[:5])
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        return Reason.INSTANCES_OUTSIDE_ZONES, f"outside the configured zones: {listed}{more}"
    return Reason.BALANCED, ""


def health_read_path(scale_set: ScaleSet) -> str:
    """Where the rebalancer reads VM health: the list it takes instance views from."""
    if scale_set.mode is OrchestrationMode.FLEXIBLE:
        return (
            f"GET /subscriptions/{scale_set.ref.subscription_id}/resourceGroups/"
            f"{scale_set.ref.resource_group}/providers/Microsoft.Compute/virtualMachines?"
            f"$filter='virtualMachineScaleSet/id' eq '{scale_set.ref.id}'&$expand=instanceView"
        )
    return f"GET {scale_set.ref.id}/virtualMachines?$expand=instanceView"


def assess(inventory: Inventory) -> Assessment:
    """Eligibility, zone counts and the move plan for one observed scale set."""
    scale_set = inventory.scale_set
    instances = inventory.instances
    counts = zone_counts(scale_set, instances)
    balanced = is_balanced(counts)
    excluded = tuple(i.id for i in sorted(instances, key=Instance.sort_id) if not i.counts)

    def result(reason: Reason, detail: str, plan: _Plan | None = None) -> Assessment:
        return Assessment(
            ref=scale_set.ref,
            zones=MappingProxyType(counts),
            balanced=balanced,
            decision=reason.decision,
            reason=reason,
            detail=detail,
            moves=plan.moves if plan else (),
            excluded=excluded,
            projected=MappingProxyType(plan.projected if plan else dict(counts)),
        )

    reason, detail = _ineligibility(scale_set, instances)
    if reason is not Reason.BALANCED:
        return result(reason, detail)
    if balanced:
        return result(Reason.BALANCED, _counts_text(counts))
    running = [i for i in instances if i.active]
    if running and all(i.health is Health.NOT_REPORTED for i in running):
        detail = (
            f"none of {len(running)} running VM(s) has vmHealth in {health_read_path(scale_set)}"
        )
        return result(Reason.HEALTH_NOT_REPORTED, detail)

    plan = _plan(scale_set, instances)
    if not plan.moves:
        reason = plan.stopped_by or Reason.NO_ELIGIBLE_SOURCE
        return result(reason, plan.stop_detail, plan)
    givers = sorted({move.from_zone for move in plan.moves}, key=zone_key)
    receivers = sorted({move.to_zone for move in plan.moves}, key=zone_key)
    detail = (
        f"{len(plan.moves)} move(s) from {_zone_list(givers)} to {_zone_list(receivers)}; "
        f"after them: {_counts_text(plan.projected)}"
    )
    if plan.stopped_by is not None:
        detail += f". The plan stops short of +/-1 ({plan.stopped_by.value}): {plan.stop_detail}"
    return result(Reason.MOVES_PLANNED, detail, plan)
