"""vCPU quota: the regional and family usage against a VM size's vCPUs (`Quota`), from the
resource SKU and usage documents Compute lists per location."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SPOT_QUOTA_FAMILY = "lowPriorityCores"
"""The usage name of the regional Spot vCPU quota (Total Regional Low-priority vCPUs)."""


@dataclass(frozen=True, slots=True)
class Quota:
    """vCPU quota for a VM size's family in one location, and the size's vCPU count."""

    family: str
    used_vcpus: int
    limit_vcpus: int
    vcpus_per_vm: int
    regional_used_vcpus: int | None = None
    regional_limit_vcpus: int | None = None

    @property
    def headroom_vms(self) -> int:
        """How many more VMs of the size fit in the family (and regional) quota."""
        free = self.limit_vcpus - self.used_vcpus
        if self.regional_limit_vcpus is not None and self.regional_used_vcpus is not None:
            free = min(free, self.regional_limit_vcpus - self.regional_used_vcpus)
        return max(0, free // max(1, self.vcpus_per_vm))


def sku_catalog(documents: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, int]]:
    """Resource SKU documents -> {lowercased VM size: (family, vCPUs)}; sizes restricted for
    the whole location (not offered to the subscription) are left out."""
    catalog: dict[str, tuple[str, int]] = {}
    for sku in documents:
        if str(sku.get("resourceType", "")).lower() != "virtualmachines" or _restricted(sku):
            continue
        vcpus = next(
            (
                str(c.get("value", ""))
                for c in sku.get("capabilities") or ()
                if str(c.get("name", "")).lower() == "vcpus"
            ),
            "",
        )
        if sku.get("name") and sku.get("family") and vcpus.isdigit():
            catalog[str(sku["name"]).lower()] = (str(sku["family"]), int(vcpus))
    return catalog


def usage_table(documents: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """Usage documents -> {lowercased usage name (a family, or `cores`): (current, limit)}."""
    table: dict[str, tuple[int, int]] = {}
    for usage in documents:
        name = (usage.get("name") or {}).get("value")
        if name:
            table[str(name).lower()] = (
                int(usage.get("currentValue") or 0),
                int(usage.get("limit") or 0),
            )
    return table


def _restricted(sku: Mapping[str, Any]) -> bool:
    """A SKU restricted for the whole location (`NotAvailableForSubscription`) is unusable."""
    return any(str(r.get("type", "")).lower() == "location" for r in sku.get("restrictions") or ())
