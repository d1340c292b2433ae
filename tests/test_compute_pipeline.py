"""Which throttling budget each ARM request spends (pure URL classification)."""

from __future__ import annotations

import pytest

from rebalancer.budget import CallKind
from rebalancer.compute.pipeline import classify_request

BASE = "https://management.azure.com/subscriptions/s"
SET = "/resourceGroups/RG/providers/Microsoft.Compute/virtualMachineScaleSets/Web"
SET_ID = (
    "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/virtualmachinescalesets/web"
)


@pytest.mark.parametrize(
    ("method", "path", "kind", "resource"),
    [
        (
            "GET",
            "/providers/Microsoft.Compute/virtualMachineScaleSets",
            CallKind.SCALE_SET_LIST,
            None,
        ),
        (
            "GET",
            "/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets",
            CallKind.SCALE_SET_LIST,
            None,
        ),
        ("GET", SET, CallKind.SCALE_SET_GET, SET_ID),
        ("GET", SET + "/virtualMachines", CallKind.SCALE_SET_VM_LIST, SET_ID),
        ("GET", SET + "/virtualMachines/3", CallKind.OTHER_READ, SET_ID),
        ("PATCH", SET, CallKind.SCALE_SET_UPDATE, SET_ID),
        ("POST", SET + "/delete", CallKind.SCALE_SET_DELETE_INSTANCES, SET_ID),
        (
            "GET",
            "/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines",
            CallKind.VM_LIST,
            None,
        ),
        (
            "GET",
            "/providers/Microsoft.Compute/locations/westeurope/usages",
            CallKind.USAGE_LIST,
            None,
        ),
        ("GET", "/providers/Microsoft.Compute/skus", CallKind.SKU_LIST, None),
        (
            "GET",
            "/providers/Microsoft.Compute/locations/westeurope/operations/abc",
            CallKind.OPERATION_STATUS,
            None,
        ),
        ("DELETE", SET + "/virtualMachines/3", CallKind.OTHER_DELETE, SET_ID),
    ],
)
def test_requests_are_charged_to_their_policies(
    method: str, path: str, kind: CallKind, resource: str | None
) -> None:
    url = f"{BASE}{path}?api-version=2026-04-01&$skiptoken=abc"
    assert classify_request(method, url) == (kind, resource)
