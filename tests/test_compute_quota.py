"""Quota arithmetic and parsing of resource SKU and usage documents (pure parts)."""

from __future__ import annotations

import pytest

from rebalancer.compute.cache import TtlCache
from rebalancer.compute.errors import AdapterError, ErrorKind
from rebalancer.compute.quota import Quota, sku_catalog, usage_table

# The body of the REST spec's Usage_List_MaximumSet_Gen example (2025-04-01).
USAGE_EXAMPLE = {
    "value": [
        {
            "unit": "Count",
            "currentValue": 17,
            "limit": 19,
            "name": {"value": "aaaaaaaaaaaaaaaaaa", "localizedValue": "aaaaaaaaaaaaaa"},
        }
    ],
    "nextLink": "aaaaaaaaaaaaaaaaaaaaaaaaaaa",
}


def sku(name: str, family: str, vcpus: str, restrictions: list | None = None) -> dict:
    return {
        "resourceType": "virtualMachines",
        "name": name,
        "tier": "Standard",
        "size": name.removeprefix("Standard_"),
        "family": family,
        "locations": ["westeurope"],
        "capabilities": [
            {"name": "MaxResourceVolumeMB", "value": "16384"},
            {"name": "vCPUs", "value": vcpus},
            {"name": "MemoryGB", "value": "8"},
        ],
        "restrictions": restrictions or [],
    }


def test_sku_catalog_keeps_offered_vm_sizes() -> None:
    documents = [
        sku("Standard_D2s_v5", "standardDSv5Family", "2"),
        sku("Standard_D4s_v5", "standardDSv5Family", "4"),
        sku(
            "Standard_M416ms_v2",
            "standardMSv2Family",
            "416",
            [
                {
                    "type": "Location",
                    "values": ["westeurope"],
                    "reasonCode": "NotAvailableForSubscription",
                }
            ],
        ),
        sku(
            "Standard_E2s_v5",
            "standardESv5Family",
            "2",
            [
                {
                    "type": "Zone",
                    "values": ["westeurope"],
                    "reasonCode": "NotAvailableForSubscription",
                }
            ],
        ),
        {"resourceType": "disks", "name": "Premium_LRS", "capabilities": []},
    ]
    assert sku_catalog(documents) == {
        "standard_d2s_v5": ("standardDSv5Family", 2),
        "standard_d4s_v5": ("standardDSv5Family", 4),
        "standard_e2s_v5": ("standardESv5Family", 2),
    }


def test_usage_table_reads_the_rest_example() -> None:
    assert usage_table(USAGE_EXAMPLE["value"]) == {"aaaaaaaaaaaaaaaaaa": (17, 19)}
    assert usage_table([{"name": {"value": "cores"}, "currentValue": 8, "limit": 100}]) == {
        "cores": (8, 100)
    }


def test_headroom_is_the_tighter_of_family_and_regional_quota() -> None:
    assert Quota("f", used_vcpus=10, limit_vcpus=20, vcpus_per_vm=4).headroom_vms == 2
    assert Quota("f", 10, 20, 2, regional_used_vcpus=95, regional_limit_vcpus=100).headroom_vms == 2
    assert Quota("f", 30, 20, 2).headroom_vms == 0


class StepClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def sleep_until(self, deadline: float) -> None:
        self.now = max(self.now, deadline)


def test_cache_serves_until_its_ttl_on_the_injected_clock() -> None:
    clock = StepClock()
    cache = TtlCache(clock)
    loads: list[int] = []

    def load() -> int:
        loads.append(1)
        return len(loads)

    assert cache.get(("skus", "westeurope"), 60, load) == 1
    clock.sleep(59)
    assert cache.get(("skus", "westeurope"), 60, load) == 1
    assert cache.get(("skus", "northeurope"), 60, load) == 2
    clock.sleep(2)
    assert cache.get(("skus", "westeurope"), 60, load) == 3


def test_cache_remembers_a_lasting_failure_briefly_and_a_throttle_not_at_all() -> None:
    clock = StepClock()
    cache = TtlCache(clock)
    calls: list[ErrorKind] = []

    def failing(kind: ErrorKind):
        def load() -> int:
            calls.append(kind)
            raise AdapterError(kind, "no")

        return load

    for _ in range(2):
        with pytest.raises(AdapterError):
            cache.get(("skus", "x"), 3600, failing(ErrorKind.NOT_FOUND))
    assert calls == [ErrorKind.NOT_FOUND]
    clock.sleep(61)
    with pytest.raises(AdapterError):
        cache.get(("skus", "x"), 3600, failing(ErrorKind.NOT_FOUND))
    for _ in range(2):
        with pytest.raises(AdapterError):
            cache.get(("usages", "x"), 3600, failing(ErrorKind.THROTTLED))
    assert calls == [ErrorKind.NOT_FOUND, ErrorKind.NOT_FOUND] + [ErrorKind.THROTTLED] * 2
