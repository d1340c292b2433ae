"""Azure Compute adapter: reads inventories, starts capacity changes and deletes, reads
quota, within a client-side throttling budget. See docs/compute-adapter.md.

The names below are loaded on first use: `rebalancer.compute.errors` (what the reconciler
and the service catch) must not pay for the adapter and azure-mgmt-compute behind it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rebalancer.compute.adapter import ComputeAdapter
    from rebalancer.compute.calls import ArmCall, OperationState, OperationStatus
    from rebalancer.compute.config import PUBLIC_ENDPOINT, ArmConfig
    from rebalancer.compute.errors import AdapterError, ErrorKind, ScaleSetGone
    from rebalancer.compute.quota import Quota

_WHERE = {
    "PUBLIC_ENDPOINT": "config",
    "ArmCall": "calls",
    "ArmConfig": "config",
    "ComputeAdapter": "adapter",
    "OperationState": "calls",
    "OperationStatus": "calls",
    "Quota": "quota",
    "AdapterError": "errors",
    "ErrorKind": "errors",
    "ScaleSetGone": "errors",
}

__all__ = [
    "PUBLIC_ENDPOINT",
    "AdapterError",
    "ArmCall",
    "ArmConfig",
    "ComputeAdapter",
    "ErrorKind",
    "OperationState",
    "OperationStatus",
    "Quota",
    "ScaleSetGone",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
