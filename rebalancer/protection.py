"""Which Flexible VMs' instance protection a decision depends on, and how a read is applied.

A Flexible scale set's VM list carries no `protectionPolicy`: each VM's protection costs a GET
(`ComputeAdapter.read_protection`). Both the inventory (before a move is planned) and the
reconciler (before a delete is written) read it for the VMs they need, and apply the flags
here, with one rule for matching names: ARM names are case-insensitive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from rebalancer.evaluator import assess, eligible_sources, zone_counts
from rebalancer.model import Instance, Inventory

Flags = tuple[bool, bool]
"""(protectFromScaleIn, protectFromScaleSetActions)."""


def possible_sources(inventory: Inventory, depth: int, *, in_flight: bool) -> list[str]:
    """VMs a move could delete from this observation, best first, without duplicates.

    The sources of the first `depth` planned moves (what one operation takes; later moves are
    planned again before they run); with `in_flight`, also every VM an operation could
    re-choose as a source (`source_candidates`), since it does so from this observation,
    often once its new VMs already balance the set and nothing is planned.
    """
    possible = [move.source for move in assess(inventory).moves[:depth]]
    if in_flight:
        possible += source_candidates(inventory, depth)
    return list(dict.fromkeys(possible))


def source_candidates(inventory: Inventory, depth: int) -> list[str]:
    """VMs an operation could choose as sources from this observation, best first.

    The operation takes up to `depth` sources, each from a zone tied at the highest count
    after the VMs it discards (at most `depth`) are left out; so a zone within `2 * depth - 1`
    of the fullest can give. Within a zone it takes the first `depth` eligible VMs that it did
    not create, and up to `depth` new VMs may sort before them: the first `2 * depth` count.
    """
    counts = zone_counts(inventory.scale_set, inventory.instances)
    if not counts:
        return []
    floor = max(count.total for count in counts.values()) - 2 * depth + 1
    return [
        instance.id
        for zone, count in counts.items()
        if count.total >= floor
        for instance in eligible_sources(inventory.instances, zone)[: 2 * depth]
    ]


def unread(names: Sequence[str], known: Mapping[str, Flags | None]) -> list[str]:
    """The names in `names` with no entry in `known` (keyed by `key`)."""
    return [name for name in names if key(name) not in known]


def key(name: str) -> str:
    """How a VM's name or id is looked up in a protection map."""
    return name.lower()


def with_protection(inventory: Inventory, known: Mapping[str, Flags | None]) -> Inventory:
    """The inventory with the flags read so far; `known` is keyed by `key(name)`, and None
    marks a VM whose protection could not be read (never a source, never taken for
    protected)."""
    return replace(
        inventory, instances=tuple(_with_flags(instance, known) for instance in inventory.instances)
    )


def _with_flags(instance: Instance, known: Mapping[str, Flags | None]) -> Instance:
    for name in (instance.name, instance.id):
        if key(name) in known:
            flags = known[key(name)]
            break
    else:
        return instance
    if flags is None:
        return replace(instance, protection_unknown=True)
    scale_in, scale_set_actions = flags
    return replace(
        instance,
        protect_from_scale_in=scale_in,
        protect_from_scale_set_actions=scale_set_actions,
        protection_unknown=False,
    )
