"""armsim: a simulated Microsoft.Compute REST API on loopback, for tests, benchmarks and demos.

The real azure-mgmt-compute client talks to it over HTTPS. Start one with
`ArmSim.start(scenario)`; see docs/armsim.md.
"""

from armsim.auth import SimCredential
from armsim.clock import VirtualClock, WallClock
from armsim.faults import FaultRule
from armsim.resources import CapacityChange, VmChange
from armsim.scenario import (
    EvictionSpec,
    QuotaSpec,
    ScaleSetSpec,
    Scenario,
    ScenarioError,
    SkuSpec,
    Timings,
    VmOverride,
    ZoneCapacity,
    load_scenario,
)
from armsim.simulator import ArmSim, OperationView, ScaleSetView, VmView

__all__ = [
    "ArmSim",
    "CapacityChange",
    "EvictionSpec",
    "FaultRule",
    "OperationView",
    "QuotaSpec",
    "ScaleSetSpec",
    "ScaleSetView",
    "Scenario",
    "ScenarioError",
    "SimCredential",
    "SkuSpec",
    "Timings",
    "VirtualClock",
    "VmChange",
    "VmOverride",
    "VmView",
    "WallClock",
    "ZoneCapacity",
    "load_scenario",
]
