"""The custom roles hold exactly what the Compute adapter's calls need, and no more.

`rebalancer.azure_operations.ADAPTER_CALLS` lists, per adapter call, the requests it sends;
the role actions are derived from it (tests/test_infra.py holds the Bicep roles to them).
Here every call runs against armsim through the real SDK client, and the requests armsim
received are held to that list both ways: a call that sends a request not listed would fail
in Azure for want of a permission; a listed request no call sends is a permission too many.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import pytest

from armsim import ArmSim, FaultRule, QuotaSpec, ScaleSetSpec, Scenario, SkuSpec, VmOverride
from rebalancer.azure_operations import (
    ADAPTER_CALLS,
    LINKED_ACCESS_ROLE_ACTIONS,
    LINKED_CHECKS,
    REQUIRED_ROLE_ACTIONS,
    SCALE_SET_ROLE_ACTIONS,
    SUBSCRIPTION_READ_ROLE_ACTIONS,
    ArmRequest,
    required_action,
)
from rebalancer.clock import VirtualTime
from rebalancer.compute import AdapterError, ArmConfig, ComputeAdapter
from rebalancer.model import OrchestrationMode, ScaleSetRef

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
SUB = "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Compute"


@pytest.mark.parametrize(
    ("method", "path", "action"),
    [
        ("GET", "/subscriptions/0000/providers/Microsoft.Compute/virtualMachineScaleSets",
         "Microsoft.Compute/virtualMachineScaleSets/read"),
        ("GET", SUB + "/virtualMachineScaleSets/web/virtualMachines",
         "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read"),
        ("GET", SUB + "/virtualMachineScaleSets/web/virtualMachines/3/instanceView",
         "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/instanceView/read"),
        ("PATCH", SUB + "/virtualMachineScaleSets/web?api-version=2024-07-01",
         "Microsoft.Compute/virtualMachineScaleSets/write"),
        ("POST", SUB + "/virtualMachineScaleSets/web/delete",
         "Microsoft.Compute/virtualMachineScaleSets/delete/action"),
        ("DELETE", SUB + "/virtualMachines/web_1",
         "Microsoft.Compute/virtualMachines/delete"),
        ("GET", "/subscriptions/0000/providers/Microsoft.Compute/locations/westeurope/operations/1",
         "Microsoft.Compute/locations/operations/read"),
        ("GET", "/subscriptions/0000/providers/Microsoft.Compute/skus",
         "Microsoft.Compute/skus/read"),
        ("GET", "/subscriptions/0000/providers/Microsoft.Insights/autoscalesettings",
         "Microsoft.Insights/autoscalesettings/read"),
        ("GET", SUB + "/virtualMachineScaleSets/web/rollingUpgrades/latest",
         "Microsoft.Compute/virtualMachineScaleSets/rollingUpgrades/read"),
    ],
)  # fmt: skip
def test_the_action_resource_manager_checks_for_a_request(method, path, action):
    assert required_action(method, path) == action


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/subscriptions/0000"), ("POST", SUB + "/virtualMachineScaleSets/web"), ("HEAD", SUB)],
)
def test_a_request_without_an_action_is_refused_with_its_path(method, path):
    with pytest.raises(ValueError, match=path.replace("/", ".")):
        required_action(method, path)


def test_every_public_adapter_call_lists_its_requests():
    public = {
        name
        for name, member in inspect.getmembers(ComputeAdapter, inspect.isfunction)
        if not name.startswith("_") and name != "close"
    }
    assert public == set(ADAPTER_CALLS)
    assert set(LINKED_CHECKS) <= set(ADAPTER_CALLS)


def test_the_roles_hold_the_actions_of_the_calls_and_the_linked_checks():
    sent = {request.action for requests in ADAPTER_CALLS.values() for request in requests}
    linked = {action for actions in LINKED_CHECKS.values() for action in actions}
    assert set(SCALE_SET_ROLE_ACTIONS) | set(SUBSCRIPTION_READ_ROLE_ACTIONS) == sent
    assert set(LINKED_ACCESS_ROLE_ACTIONS) == linked
    assert set(REQUIRED_ROLE_ACTIONS) == sent | linked
    assert not set(SCALE_SET_ROLE_ACTIONS) & set(SUBSCRIPTION_READ_ROLE_ACTIONS)


# --- every call against armsim --------------------------------------------------------------

SCENARIO = Scenario(
    skus=(SkuSpec("Standard_D2s_v5", vcpus=2, family="standardDSv5Family"),),
    quotas=(
        QuotaSpec("westeurope", "standardDSv5Family", 100),
        QuotaSpec("westeurope", "cores", 100),
    ),
    scale_sets=(
        ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3}),
        ScaleSetSpec(
            "flex",
            "rg-flex",
            mode="Flexible",
            counts={"1": 1, "2": 3, "3": 3},
            overrides=(VmOverride(zone="3", count=1, protect_from_scale_in=True),),
        ),
    ),
)


def exercise(sim: ArmSim, adapter: ComputeAdapter) -> list[tuple[str, Callable[[], Any]]]:
    """Every adapter call, in every branch that sends a request of its own."""
    web = ScaleSetRef(sim.subscription_id, "rg-web", "web")
    flex = ScaleSetRef(sim.subscription_id, "rg-flex", "flex")
    call = {}

    def scale_out() -> None:
        call["capacity"] = adapter.set_capacity(web, 8)

    def poll() -> None:
        sim.advance(120)
        adapter.operation_status(call["capacity"])

    def delete_refused_as_missing(ref: ScaleSetRef, instance: str) -> None:
        sim.faults.add(FaultRule("error", operation="vmss.delete_instances", status=404))
        with suppress(AdapterError):  # the instance is still listed: the refusal stands
            adapter.delete_instances(ref, [instance])

    flex_vms = [vm.name for vm in sim.scale_set("rg-flex", "flex").vms if vm.zone == "2"]
    listed = adapter.list_scale_sets(["rg-web", "rg-flex"])  # before the calls are counted
    return [
        ("list_scale_sets", lambda: adapter.list_scale_sets(None)),
        ("list_scale_sets", lambda: adapter.list_scale_sets(["rg-web", "rg-flex"])),
        ("get_scale_set", lambda: adapter.get_scale_set(web)),
        ("latest_rolling_upgrade", lambda: adapter.latest_rolling_upgrade(web)),
        ("vm_scale_set", lambda: adapter.vm_scale_set("rg-flex", flex_vms[0])),
        ("vm_scale_set", lambda: adapter.vm_scale_set("rg-flex", "no-such-vm")),
        ("read_inventory", lambda: adapter.read_inventory(web, NOW)),
        ("read_inventory", lambda: adapter.read_inventory(flex, NOW)),
        ("audit", lambda: adapter.audit(None, NOW)),
        ("audit", lambda: adapter.audit(["rg-web", "rg-flex"], NOW)),
        ("read_inventories", lambda: adapter.read_inventories(listed, NOW)),
        ("read_protection", lambda: adapter.read_protection(flex, flex_vms[0])),
        ("set_capacity", scale_out),
        ("operation_status", poll),
        ("vm_health", lambda: adapter.vm_health(web, OrchestrationMode.UNIFORM, ["0"])),
        ("vm_health", lambda: adapter.vm_health(flex, OrchestrationMode.FLEXIBLE, flex_vms[:1])),
        ("delete_instances", lambda: adapter.delete_instances(web, ["6"])),
        ("delete_instances", lambda: adapter.delete_instances(flex, flex_vms[:1])),
        ("delete_instances", lambda: adapter.delete_instances(web, ["no-such-instance"])),
        ("delete_instances", lambda: delete_refused_as_missing(web, "0")),
        ("delete_instances", lambda: delete_refused_as_missing(flex, flex_vms[1])),
        ("quota", lambda: adapter.quota("westeurope", "Standard_D2s_v5")),
        ("autoscale_settings", lambda: adapter.autoscale_settings(fresh=True)),
    ]


@pytest.mark.integration
def test_every_call_sends_exactly_the_requests_it_lists():
    with ArmSim.start(SCENARIO) as sim:
        # No reuse of protection reads: every call sends the requests of its own branch.
        config = ArmConfig(
            sim.subscription_id,
            endpoint=sim.endpoint,
            ca_cert=sim.ca_cert_path,
            flexible_protection_ttl=0,
        )
        with ComputeAdapter(config, sim.credential, clock=VirtualTime(sim.clock)) as adapter:
            sent: dict[str, set[ArmRequest]] = {name: set() for name in ADAPTER_CALLS}
            for name, run in exercise(sim, adapter):
                sim.clear_requests()
                run()
                assert sim.requests, f"{name} sent nothing"
                for record in sim.requests:
                    listed = [r for r in ADAPTER_CALLS[name] if matches(r, record.path)]
                    assert any(r.method == record.method for r in listed), (
                        f"{name} sent {record.method} {record.path}, which ADAPTER_CALLS does "
                        f"not list: it needs {required_action(record.method, record.path)}"
                    )
                    sent[name].add(next(r for r in listed if r.method == record.method))
    assert sent == {name: set(requests) for name, requests in ADAPTER_CALLS.items()}


def matches(request: ArmRequest, path: str) -> bool:
    pattern = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(request.path))
    return re.fullmatch(pattern, path, re.IGNORECASE) is not None
