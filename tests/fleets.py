"""Builders for scale sets and fleets of VMs used by the evaluator tests."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from rebalancer.model import (
    Health,
    HealthMonitoring,
    Instance,
    Inventory,
    OrchestrationMode,
    PowerState,
    ScaleSet,
    ScaleSetRef,
)

OBSERVED_AT = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
REF = ScaleSetRef("00000000-0000-0000-0000-000000000000", "rg-web", "web")


def scale_set(
    zones: Iterable[str] = ("1", "2", "3"),
    *,
    sku: str | None = "Standard_D2s_v5",
    mode: OrchestrationMode = OrchestrationMode.UNIFORM,
    state: str = "Succeeded",
    monitoring: HealthMonitoring = HealthMonitoring.EXTENSION,
    platform_rebalancing: bool = False,
) -> ScaleSet:
    return ScaleSet(
        ref=REF,
        location="westeurope",
        zones=tuple(zones),
        sku_name=sku,
        capacity=None,
        mode=mode,
        provisioning_state=state,
        health_monitoring=monitoring,
        platform_rebalancing=platform_rebalancing,
    )


def vm(
    vm_id: str | int,
    zone: str | None,
    *,
    power: PowerState = PowerState.RUNNING,
    health: Health = Health.HEALTHY,
    state: str = "Succeeded",
    protected: bool = False,
    latest: bool = True,
    failure: str | None = None,
) -> Instance:
    return Instance(
        id=str(vm_id),
        name=f"web_{vm_id}",
        zone=zone,
        provisioning_state=state,
        power_state=power,
        health=health,
        protect_from_scale_in=protected,
        latest_model=latest,
        failure=failure,
    )


def fleet(*zones: tuple[str, int, int]) -> tuple[Instance, ...]:
    """VMs from `(zone, active, deallocated)` triples, instance ids numbered from 0."""
    instances: list[Instance] = []
    for zone, active, deallocated in zones:
        for _ in range(active):
            instances.append(vm(len(instances), zone))
        for _ in range(deallocated):
            instances.append(
                vm(len(instances), zone, power=PowerState.DEALLOCATED, health=Health.NOT_REPORTED)
            )
    return tuple(instances)


def inventory(instances: Iterable[Instance], scale: ScaleSet | None = None) -> Inventory:
    return Inventory(scale or scale_set(), tuple(instances), OBSERVED_AT)
