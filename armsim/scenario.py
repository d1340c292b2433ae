"""Scenarios: the declarative starting point of a simulated subscription.

Build one in code (`Scenario(scale_sets=(ScaleSetSpec(...),))`) or load a TOML/JSON file with
`load_scenario(path)`; both give the same frozen values. Unknown keys and bad values raise
`ScenarioError` naming the key path and what is allowed.
"""

from __future__ import annotations

import functools
import json
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from armsim.clock import DEFAULT_START
from armsim.faults import FaultRule
from armsim.throttling import HEADER_STYLES

DEFAULT_SUBSCRIPTION = "00000000-0000-4000-8000-000000000001"
DEFAULT_TENANT = "72f988bf-0000-4141-91ab-2d7cd011db47"
DEFAULT_APP_PRINCIPAL = "9d2c1b0a-1111-4222-8333-444455556666"
DEFAULT_ACTOR_PRINCIPAL = "5b7e3c2d-2222-4333-8444-555566667777"

HEALTH_VALUES = ("healthy", "unhealthy", "unknown", "initializing")
POWER_VALUES = ("running", "stopped", "deallocated")
PROVISIONING_VALUES = ("Succeeded", "Creating", "Failed")
MONITORING_VALUES = ("extension", "probe", "none")
HEALTH_STATES_VALUES = ("rich", "binary")
LRO_HEADER_VALUES = ("compute", "location")
MODES = ("Uniform", "Flexible")
PRIORITY_VALUES = ("Regular", "Spot")
EVICTION_VALUES = ("Deallocate", "Delete")


class ScenarioError(ValueError):
    """A scenario that cannot be loaded; the message names the key and the fix."""


@dataclass(frozen=True, slots=True)
class SkuSpec:
    name: str
    vcpus: int = 2
    family: str = "standardDSv5Family"
    unavailable_locations: tuple[str, ...] = ()
    """Locations where the size is not offered to this subscription (SkuNotAvailable)."""


@dataclass(frozen=True, slots=True)
class ZoneCapacity:
    """Free VM slots for one size in one zone; zones not listed have unlimited room."""

    location: str
    sku: str
    zone: str
    available: int


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    """A vCPU limit per location: a family (`standardDSv5Family`) or `cores` (regional)."""

    location: str
    family: str
    limit: int


@dataclass(frozen=True, slots=True)
class VmOverride:
    """Changes the VMs a scale set starts with.

    Selects `instance` (a Uniform instance id or a Flexible VM's position "0", "1", ... in
    creation order), or the first `count` VMs of `zone` not already overridden.
    """

    zone: str | None = None
    count: int = 1
    instance: str | None = None
    health: str | None = None
    power_state: str | None = None
    provisioning_state: str | None = None
    protect_from_scale_in: bool | None = None
    protect_from_scale_set_actions: bool | None = None
    latest_model: bool | None = None
    name: str | None = None
    """Flexible only: the VM was created with this name instead of `<scale set>_<8 hex>`
    (a VM attached to the scale set by its `virtualMachineScaleSet` reference)."""
    priority: str | None = None
    """`Regular` or `Spot`: the VM's priority (in a priority mix, instead of the split's)."""


@dataclass(frozen=True, slots=True)
class ScaleSetSpec:
    name: str
    resource_group: str
    location: str = "westeurope"
    mode: str = "Uniform"
    sku: str = "Standard_D2s_v5"
    zones: tuple[str, ...] = ("1", "2", "3")
    counts: Mapping[str, int] = field(default_factory=dict)
    """VMs per zone at start; `capacity` defaults to their sum."""
    capacity: int | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    health_monitoring: str = "extension"
    """`extension` (Application Health extension), `probe` (LB probe, Uniform only), `none`."""
    platform_rebalancing: bool = False
    """`resiliencyPolicy.automaticZoneRebalancingPolicy.enabled`."""
    zone_balance: bool = False
    terminate_notification_seconds: int | None = None
    """`scheduledEventsProfile.terminateNotificationProfile.notBeforeTimeout`, when enabled."""
    new_vm_health: str = "healthy"
    """What new VMs become after the health delay: healthy, unhealthy, unknown, initializing."""
    health_states: str = "rich"
    """The Application Health extension's mode: `rich` reports healthy, unhealthy,
    initializing and unknown; `binary` only healthy and unhealthy (a VM still warming up,
    or one whose state is unknown, reads unhealthy)."""
    overprovision: bool = True
    """Uniform only (`properties.overprovision`, true unless set): a scale-out creates extra
    VMs, placed like the requested ones, and deletes them once the requested number succeeded.
    Flexible scale sets never overprovision."""
    provisioning_state: str = "Succeeded"
    overrides: tuple[VmOverride, ...] = ()
    priority: str = "Regular"
    """`virtualMachineProfile.priority`: `Regular` or `Spot` (Azure's default is Regular)."""
    eviction_policy: str = "Deallocate"
    """Spot only (`evictionPolicy`): evicted VMs are `Deallocate`d (Azure's default) or
    `Delete`d (and `sku.capacity` drops by one)."""
    base_regular_priority_count: int | None = None
    regular_priority_percentage_above_base: int | None = None
    """Flexible Spot only (`priorityMixPolicy`): give either to mix regular and Spot VMs."""
    vm_sizes: tuple[str, ...] = ()
    """Flexible only: instance mix (`sku.name` "Mix", `skuProfile.vmSizes`); VMs get the
    first size."""
    standby: Mapping[str, int] = field(default_factory=dict)
    """Flexible only: VMs per zone waiting in an attached standby pool (running, listed with
    `isVMInStandbyPool`); a scale-out takes them before it creates VMs."""

    @property
    def key(self) -> str:
        return f"{self.resource_group}/{self.name}".lower()

    @property
    def priority_mix(self) -> bool:
        return (
            self.base_regular_priority_count is not None
            or self.regular_priority_percentage_above_base is not None
        )


@dataclass(frozen=True, slots=True)
class EvictionSpec:
    """Azure evicts `count` running Spot VMs of a scale set (of `zone`, if given) at
    `after_seconds` on the virtual clock, as its `evictionPolicy` says; no event."""

    resource_group: str
    scale_set: str
    after_seconds: float
    count: int = 1
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class Timings:
    """Virtual seconds each transition takes."""

    create: float = 60.0
    """Creating -> Succeeded (or Failed)."""
    health: float = 30.0
    """Succeeded -> first health report (initializing until then)."""
    delete: float = 30.0
    """Deleting -> gone (after any terminate notification delay)."""
    update: float = 5.0
    """A write that creates or deletes nothing (tags, protection) completes after this."""
    deallocate: float = 20.0
    poll_advance: float = 0.0
    """If > 0, each poll of an unfinished operation moves a virtual clock this far, so a
    client blocked in `poller.result()` makes progress without another thread."""


@dataclass(frozen=True, slots=True)
class Scenario:
    subscription_id: str = DEFAULT_SUBSCRIPTION
    tenant_id: str = DEFAULT_TENANT
    start: datetime = DEFAULT_START
    seed: int = 0
    app_principal_id: str = DEFAULT_APP_PRINCIPAL
    """Object id in tokens of `ArmSim.credential` (the app's own identity)."""
    actor_principal_id: str = DEFAULT_ACTOR_PRINCIPAL
    """Object id of outside actors (a person, autoscale) in the events they cause."""
    resource_groups: tuple[str, ...] = ()
    """Resource groups besides those of the scale sets."""
    skus: tuple[SkuSpec, ...] = ()
    capacity: tuple[ZoneCapacity, ...] = ()
    quotas: tuple[QuotaSpec, ...] = ()
    scale_sets: tuple[ScaleSetSpec, ...] = ()
    evictions: tuple[EvictionSpec, ...] = ()
    faults: tuple[FaultRule, ...] = ()
    timings: Timings = field(default_factory=Timings)
    throttling: bool = False
    throttle_header_style: str = "current"
    """`current`: throttling headers as Azure answers today (windowless policy names and the
    write counters); `legacy`: the older names with a window (`GetVMScaleSet3Min`)."""
    page_size: int = 100
    """Items per page of list answers (the rest comes through `nextLink`)."""
    lro_headers: str = "compute"
    """Headers a long-running write is answered with: `compute` (as recorded from Compute:
    `Azure-AsyncOperation`, plus `Location` on a 202) or `location` (`Location` only, which
    the ARM async spec allows)."""
    lro_retry_after: int | None = None
    """`Retry-After` seconds on long-running answers and unfinished status polls; Compute's
    recorded answers carry none, so none by default."""
    vm_health_in_lists: tuple[str, ...] = MODES
    """Orchestration modes whose VM list answers with `$expand=instanceView` carry
    `vmHealth` (the VMSS-VM list for Uniform, the virtualMachines list for Flexible). Leave a
    mode out to model health that never surfaces on that read path."""
    failure_codes_in_lists: tuple[str, ...] = MODES
    """Orchestration modes whose VM list answers with `$expand=instanceView` carry a failed
    VM's sub-code (`ProvisioningState/failed/<code>`; without it: `ProvisioningState/failed`).
    Leave a mode out to model a failure whose code only the operation's `error` names."""

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scenario:
        """Build from plain data (a parsed TOML or JSON file). Raises ScenarioError."""
        try:
            return _build(cls, data, "scenario")
        except ScenarioError:
            raise
        except (TypeError, ValueError) as error:
            raise ScenarioError(f"scenario: {error}") from error


def load_scenario(path: str | Path) -> Scenario:
    """Read a `.toml` or `.json` scenario file. Raises ScenarioError with one clear line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ScenarioError(f"{path}: cannot read the scenario file ({error.strerror})") from error
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        kind = path.suffix.lstrip(".") or "TOML"
        raise ScenarioError(f"{path}: not valid {kind}: {error}") from error
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: the top level must be a table/object")
    try:
        return Scenario.from_dict(data)
    except ScenarioError as error:
        raise ScenarioError(f"{path}: {error}") from error


# --- building dataclasses from plain data, strictly ---------------------------------------

_DURATION = re.compile(r"^PT(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+)S)?$")


def parse_iso_duration(text: str) -> int:
    """`PT5M` -> 300. Only the hour/minute/second forms ARM uses for notBeforeTimeout."""
    match = _DURATION.match(text or "")
    if match is None or not any(match.groupdict().values()):
        raise ValueError(f"not an ISO 8601 duration like PT5M: {text!r}")
    return int(match["h"] or 0) * 3600 + int(match["m"] or 0) * 60 + int(match["s"] or 0)


_ALIASES = {"terminate_notification": "terminate_notification_seconds"}


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """Type hints and fields of a scenario dataclass (cached: files can hold thousands)."""
    return typing.get_type_hints(cls), {f.name: f for f in fields(cls)}


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{where}: expected a table/object, got {type(data).__name__}")
    hints, known = _schema(cls)
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = _ALIASES.get(raw_key, raw_key)
        if key not in known:
            raise ScenarioError(f"{where}: unknown key {raw_key!r} (known: {', '.join(known)})")
        if key == "terminate_notification_seconds" and isinstance(value, str):
            try:
                value = parse_iso_duration(value)
            except ValueError as error:
                raise ScenarioError(f"{where}.{raw_key}: {error}") from error
        values[key] = _convert(hints[key], value, f"{where}.{raw_key}")
    for name, spec in known.items():
        if name not in values and spec.default is MISSING and spec.default_factory is MISSING:
            raise ScenarioError(f"{where}: missing required key {name!r}")
    try:
        return cls(**values)
    except ScenarioError as error:
        raise ScenarioError(f"{where}: {error}") from error
    except (TypeError, ValueError) as error:
        raise ScenarioError(f"{where}: {error}") from error


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _convert(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ScenarioError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin in (Mapping, dict) or hint in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ScenarioError(f"{where}: expected a table/object, got {type(value).__name__}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _convert(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if hint is datetime:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError as error:
                raise ScenarioError(f"{where}: not an ISO 8601 time: {value!r}") from error
        else:
            raise ScenarioError(f"{where}: expected an ISO 8601 time string")
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
        return _build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ScenarioError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _validate(scenario: Scenario) -> None:
    seen: set[str] = set()
    sku_names = {sku.name.lower() for sku in scenario.skus}
    if scenario.page_size < 1:
        raise ScenarioError(f"page_size must be >= 1, got {scenario.page_size}")
    if scenario.throttle_header_style not in HEADER_STYLES:
        raise ScenarioError(
            f"throttle_header_style must be one of {HEADER_STYLES}, "
            f"got {scenario.throttle_header_style!r}"
        )
    if scenario.lro_headers not in LRO_HEADER_VALUES:
        raise ScenarioError(
            f"lro_headers must be one of {LRO_HEADER_VALUES}, got {scenario.lro_headers!r}"
        )
    if scenario.lro_retry_after is not None and scenario.lro_retry_after < 0:
        raise ScenarioError(f"lro_retry_after must be >= 0, got {scenario.lro_retry_after}")
    for name in ("vm_health_in_lists", "failure_codes_in_lists"):
        unknown_modes = set(getattr(scenario, name)) - set(MODES)
        if unknown_modes:
            raise ScenarioError(f"{name} may name only {MODES}, got {sorted(unknown_modes)}")
    for index, spec in enumerate(scenario.scale_sets):
        where = f"scale_sets[{index}] ({spec.name})"
        if spec.key in seen:
            raise ScenarioError(f"{where}: duplicate scale set {spec.resource_group}/{spec.name}")
        seen.add(spec.key)
        if spec.mode not in MODES:
            raise ScenarioError(f"{where}: mode must be one of {MODES}, got {spec.mode!r}")
        if spec.health_monitoring not in MONITORING_VALUES:
            raise ScenarioError(
                f"{where}: health_monitoring must be one of {MONITORING_VALUES}, "
                f"got {spec.health_monitoring!r}"
            )
        if spec.mode == "Flexible" and spec.health_monitoring == "probe":
            raise ScenarioError(
                f"{where}: Flexible scale sets support only the health extension, not 'probe'"
            )
        if spec.health_states not in HEALTH_STATES_VALUES:
            raise ScenarioError(
                f"{where}: health_states must be one of {HEALTH_STATES_VALUES}, "
                f"got {spec.health_states!r}"
            )
        if spec.new_vm_health not in HEALTH_VALUES:
            raise ScenarioError(
                f"{where}: new_vm_health must be one of {HEALTH_VALUES}, got {spec.new_vm_health!r}"
            )
        for zone, count in spec.counts.items():
            if spec.zones and zone not in spec.zones:
                raise ScenarioError(f"{where}: counts has zone {zone!r} not in zones {spec.zones}")
            if count < 0:
                raise ScenarioError(f"{where}: counts[{zone!r}] must be >= 0")
        if not spec.zones and set(spec.counts) - {""}:
            raise ScenarioError(f"{where}: a regional scale set takes counts under the key ''")
        if spec.capacity is not None and spec.capacity < sum(spec.counts.values()):
            raise ScenarioError(f"{where}: capacity is below the sum of counts")
        if sku_names and spec.sku.lower() not in sku_names:
            raise ScenarioError(f"{where}: sku {spec.sku!r} is not among the scenario's skus")
        _validate_spot_and_mix(spec, where)
        for o_index, override in enumerate(spec.overrides):
            _validate_override(override, f"{where}.overrides[{o_index}]")
            if override.name is not None and (spec.mode != "Flexible" or override.count != 1):
                raise ScenarioError(
                    f"{where}.overrides[{o_index}]: 'name' renames one Flexible VM; use it with "
                    "mode = \"Flexible\" and a single VM ('instance', or count = 1)"
                )


def _validate_spot_and_mix(spec: ScaleSetSpec, where: str) -> None:
    if spec.priority not in PRIORITY_VALUES:
        raise ScenarioError(f"{where}: priority must be one of {PRIORITY_VALUES}")
    if spec.eviction_policy not in EVICTION_VALUES:
        raise ScenarioError(f"{where}: eviction_policy must be one of {EVICTION_VALUES}")
    flexible_only = {
        "a priority mix (base_regular_priority_count, regular_priority_percentage_above_base)": (
            spec.priority_mix
        ),
        "instance mix (vm_sizes)": bool(spec.vm_sizes),
        "a standby pool (standby)": bool(spec.standby),
    }
    for what, used in flexible_only.items():
        if used and spec.mode != "Flexible":
            raise ScenarioError(f'{where}: {what} needs mode = "Flexible"')
    if spec.priority_mix and spec.priority != "Spot":
        raise ScenarioError(f'{where}: a priority mix needs priority = "Spot"')
    percent = spec.regular_priority_percentage_above_base
    if percent is not None and not 0 <= percent <= 100:
        raise ScenarioError(f"{where}: regular_priority_percentage_above_base is 0..100")
    for zone, count in spec.standby.items():
        if zone not in spec.zones or count < 0:
            raise ScenarioError(f"{where}: standby[{zone!r}] needs a zone of the set, count >= 0")


def _validate_override(override: VmOverride, where: str) -> None:
    if (override.zone is None) == (override.instance is None):
        raise ScenarioError(f"{where}: give exactly one of 'zone' (with count) or 'instance'")
    if override.priority is not None and override.priority not in PRIORITY_VALUES:
        raise ScenarioError(f"{where}: priority must be one of {PRIORITY_VALUES}")
    if override.health is not None and override.health not in HEALTH_VALUES:
        raise ScenarioError(f"{where}: health must be one of {HEALTH_VALUES}")
    if override.power_state is not None and override.power_state not in POWER_VALUES:
        raise ScenarioError(f"{where}: power_state must be one of {POWER_VALUES}")
    if (
        override.provisioning_state is not None
        and override.provisioning_state not in PROVISIONING_VALUES
    ):
        raise ScenarioError(f"{where}: provisioning_state must be one of {PROVISIONING_VALUES}")
