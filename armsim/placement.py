"""Where the platform puts new VMs and which VMs a capacity decrease removes. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from armsim.resources import Vm


def placement_order(
    zones: Sequence[str | None], counts: Mapping[str | None, int], *, strict: bool
) -> list[str | None]:
    """Zones to try for one new VM: fewest VMs first, then the scale set's zone order.

    Best effort (`zoneBalance` false) lets a VM land in any zone when the emptiest ones have no
    room; strict zone balance allows only the emptiest zones.
    """
    ranked = sorted(zones, key=lambda zone: (counts.get(zone, 0), zones.index(zone)))
    if strict and ranked:
        lowest = counts.get(ranked[0], 0)
        ranked = [zone for zone in ranked if counts.get(zone, 0) == lowest]
    return ranked


def overprovision_extras(count: int) -> int:
    """Extra VMs an overprovisioned Uniform scale-out of `count` creates. Azure documents no
    number; 2 extras for 5 requested is what the recorded create shows (instance ids 0-6 for a
    capacity of 5), and at least one extra for any scale-out."""
    return 0 if count <= 0 else max(1, (2 * count + 4) // 5)


def scale_in_order(members: Sequence[Vm], counts: Mapping[str | None, int], count: int) -> list[Vm]:
    """The platform's default scale-in: failed VMs first, then from the zone with the most
    VMs, highest instance id first. VMs protected from scale-in, or from scale set actions
    (which includes scale-in), are never chosen."""
    candidates = [
        vm for vm in members if not (vm.protect_from_scale_in or vm.protect_from_scale_set_actions)
    ]
    failed = sorted(
        (vm for vm in candidates if vm.provisioning_state == "Failed"),
        key=Vm.sort_key,
        reverse=True,
    )
    chosen: list[Vm] = failed[:count]
    remaining = [vm for vm in candidates if vm not in chosen]
    left = dict(counts)
    while len(chosen) < count and remaining:
        zone = max({vm.zone for vm in remaining}, key=lambda z: (left.get(z, 0), str(z)))
        pick = max((vm for vm in remaining if vm.zone == zone), key=Vm.sort_key)
        chosen.append(pick)
        remaining.remove(pick)
        left[zone] = left.get(zone, 0) - 1
    return chosen
