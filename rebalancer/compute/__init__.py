"""Azure Compute adapter: reads inventories, starts capacity changes and deletes, reads
quota, within a client-side throttling budget. See docs/compute-adapter.md."""

from rebalancer.compute.adapter import (
    PUBLIC_ENDPOINT,
    ArmCall,
    ArmConfig,
    ComputeAdapter,
    OperationState,
    OperationStatus,
    Quota,
)
from rebalancer.compute.clock import Clock, SystemClock
from rebalancer.compute.errors import AdapterError, ErrorKind, ScaleSetGone

__all__ = [
    "PUBLIC_ENDPOINT",
    "AdapterError",
    "ArmCall",
    "ArmConfig",
    "Clock",
    "ComputeAdapter",
    "ErrorKind",
    "OperationState",
    "OperationStatus",
    "Quota",
    "ScaleSetGone",
    "SystemClock",
]
