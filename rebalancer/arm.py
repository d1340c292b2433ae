"""ARM JSON -> the typed values of `rebalancer.model`.

Two shapes of the same objects arrive here, and each object may come in either one:

- the REST shape (`GET` responses, and azure-mgmt-compute's `as_dict()`), where the
  resource's own fields sit under `properties`;
- the `az` CLI shape, where the `properties` level is flattened into the object (and a
  nested extension's `properties.type` becomes `typePropertiesType`).

Missing or unknown fields get safe defaults (documented per field below) instead of
errors; only a document that cannot be what the caller asked for raises `ArmParseError`.
Keys are matched exactly first and case-insensitively as a fallback, because hand-written
templates spell some of them in PascalCase.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from rebalancer.model import (
    AutomaticRepairs,
    Health,
    HealthMonitoring,
    Instance,
    OrchestrationMode,
    PowerState,
    PriorityMix,
    RepairAction,
    RollingUpgrade,
    ScaleSet,
    ScaleSetRef,
    frozen_mapping,
)

SCALE_SET_TYPE = "microsoft.compute/virtualmachinescalesets"
VM_TYPE = "microsoft.compute/virtualmachines"
VM_TYPES = frozenset({VM_TYPE, "microsoft.compute/virtualmachinescalesets/virtualmachines"})
HEALTH_EXTENSION_TYPES = frozenset({"applicationhealthlinux", "applicationhealthwindows"})

_PROVISIONING_STATES = {
    state.lower(): state
    for state in (
        "Succeeded",
        "Failed",
        "Canceled",
        "Creating",
        "Updating",
        "Deleting",
        "Migrating",
        "Unknown",
    )
}
_DURATION = re.compile(
    r"^P(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$",
    re.IGNORECASE,
)


class ArmParseError(ValueError):
    """The JSON is not the ARM object the caller expected; the message names the problem."""


# --- small readers ----------------------------------------------------------------------


_ABSENT = object()


def _get(obj: Any, key: str) -> Any:
    """`obj[key]`, matching the key case-insensitively if the exact spelling is absent.

    An audit parses a few hundred thousand fields a tick, most of them present, some absent
    (no `protectionPolicy`): the common cases are kept to C-level lookups."""
    if obj is None:
        return None
    if type(obj) is not dict and not isinstance(obj, Mapping):
        return None
    value = obj.get(key, _ABSENT)
    if value is not _ABSENT:
        return value
    lowered = key.lower()
    if type(obj) is dict:  # as `json.loads` makes them: every key a string
        try:
            if lowered not in map(str.lower, obj):
                return None
        except TypeError:  # a key that is not a string: look at each below
            pass
    for name, value in obj.items():
        if isinstance(name, str) and name.lower() == lowered:
            return value
    return None


def _path(obj: Any, *keys: str) -> Any:
    for key in keys:
        obj = _get(obj, key)
        if obj is None:
            return None
    return obj


def _prop(doc: Mapping[str, Any], *keys: str) -> Any:
    """A resource field from `properties.<keys>` (REST) or `<keys>` (az, flattened)."""
    return _field(doc, _get(doc, "properties"), *keys)


def _field(doc: Any, properties: Any, *keys: str) -> Any:
    """`_prop` with the document's `properties` already looked up."""
    value = _path(properties, *keys)
    return value if value is not None else _path(doc, *keys)


def _text(value: Any) -> str | None:
    if type(value) is str:
        return value
    if value is None or isinstance(value, Mapping | list):
        return None
    return str(value)


def _flag(value: Any) -> bool:
    """ARM booleans, tolerating `"true"`/`"false"` strings from hand-edited files."""
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return value is True


def provisioning_state(value: str | None) -> str:
    """Canonical spelling of a provisioning state (`succeeded` -> `Succeeded`)."""
    if not value:
        return "Unknown"
    return _PROVISIONING_STATES.get(value.lower(), value[:1].upper() + value[1:])


def parse_duration(value: Any) -> timedelta | None:
    """ISO 8601 duration (`PT10M`, `P1DT2H`) -> timedelta; None when absent or malformed."""
    text = _text(value)
    match = _DURATION.match(text.strip()) if text else None
    if match is None or not any(match.groupdict().values()):
        return None
    parts = {name: float(amount) for name, amount in match.groupdict().items() if amount}
    return timedelta(**parts)


def parse_time(value: Any) -> datetime | None:
    """ARM timestamps -> aware datetimes (naive ones are UTC); None when absent or malformed."""
    text = _text(value)
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _zones(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(str(zone) for zone in value if zone is not None and str(zone) != "")


def _tags(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        return frozen_mapping()
    return frozen_mapping({str(k): "" if v is None else str(v) for k, v in value.items()})


def _describe(doc: Any) -> str:
    if isinstance(doc, Mapping):
        for key in ("id", "name"):
            text = _text(_get(doc, key))
            if text:
                return f"{key} {text!r}"
        return "object without id or name"
    return f"a JSON {type(doc).__name__}"


# --- scale set --------------------------------------------------------------------------


def _health_monitoring(doc: Mapping[str, Any]) -> HealthMonitoring:
    profile = _prop(doc, "virtualMachineProfile")
    extensions = _path(profile, "extensionProfile", "extensions")
    for extension in extensions if isinstance(extensions, list) else ():
        kinds = (
            _path(extension, "properties", "type"),
            _get(extension, "typePropertiesType"),
        )
        if any((_text(kind) or "").lower() in HEALTH_EXTENSION_TYPES for kind in kinds):
            return HealthMonitoring.EXTENSION
    if _text(_path(profile, "networkProfile", "healthProbe", "id")):
        return HealthMonitoring.LOAD_BALANCER_PROBE
    return HealthMonitoring.NONE


def _terminate_notification(doc: Mapping[str, Any]) -> timedelta | None:
    profile = _prop(doc, "virtualMachineProfile", "scheduledEventsProfile")
    notification = _get(profile, "terminateNotificationProfile")
    if not isinstance(notification, Mapping):
        return None
    enabled = _get(notification, "enable")
    if enabled is not None and not _flag(enabled):
        return None
    # Azure's default notBeforeTimeout is 5 minutes when the profile is enabled without one.
    return parse_duration(_get(notification, "notBeforeTimeout")) or timedelta(minutes=5)


def _automatic_repairs(doc: Mapping[str, Any]) -> AutomaticRepairs | None:
    """The enabled repairs policy, with Azure's defaults (PT30M, Replace) for absent fields.
    An action this version does not know reads as Replace: the one that replaces VMs, which
    the operation must expect."""
    policy = _prop(doc, "automaticRepairsPolicy")
    if not isinstance(policy, Mapping) or not _flag(_get(policy, "enabled")):
        return None
    grace = parse_duration(_get(policy, "gracePeriod")) or timedelta(minutes=30)
    named = (_text(_get(policy, "repairAction")) or "").lower()
    action = next((a for a in RepairAction if a.value.lower() == named), RepairAction.REPLACE)
    return AutomaticRepairs(grace_period=grace, action=action)


def _orchestration_mode(doc: Mapping[str, Any]) -> OrchestrationMode:
    value = _text(_prop(doc, "orchestrationMode"))
    if value is None:
        return OrchestrationMode.UNIFORM  # older API versions omit it: those sets are Uniform
    for mode in OrchestrationMode:
        if mode.value.lower() == value.lower():
            return mode
    raise ArmParseError(
        f"scale set has an unknown orchestrationMode {value!r}; expected Uniform or Flexible"
    )


def _is_spot(priority: Any) -> bool:
    """`priority` Spot, or Low (its older name); Regular or absent is not Spot."""
    return (_text(priority) or "").lower() in {"spot", "low"}


def _priority_mix(doc: Mapping[str, Any]) -> PriorityMix | None:
    policy = _prop(doc, "priorityMixPolicy")
    if not isinstance(policy, Mapping):
        return None
    base = _get(policy, "baseRegularPriorityCount")
    percent = _get(policy, "regularPriorityPercentageAboveBase")
    return PriorityMix(
        base_regular=base if isinstance(base, int) and not isinstance(base, bool) else 0,
        regular_percent_above_base=(
            percent if isinstance(percent, int) and not isinstance(percent, bool) else 0
        ),
    )


def _vm_sizes(doc: Mapping[str, Any]) -> tuple[str, ...]:
    """Instance mix: the names in `skuProfile.vmSizes` (REST: under `properties`)."""
    sizes = _prop(doc, "skuProfile", "vmSizes")
    names = (_text(_get(size, "name")) for size in sizes) if isinstance(sizes, list) else ()
    return tuple(name for name in names if name)


def parse_scale_set(doc: Mapping[str, Any]) -> ScaleSet:
    """A scale set from `GET .../virtualMachineScaleSets/{name}` or `az vmss show`.

    Defaults: no `zones` -> () (not zonal); no `sku` -> no SKU name and capacity None; no
    `orchestrationMode` -> Uniform; no provisioning state -> "Unknown"; no health extension
    or LB probe -> HealthMonitoring.NONE; no rebalancing policy -> False.
    Raises ArmParseError when the document is not a single scale set.
    """
    if not isinstance(doc, Mapping):
        raise ArmParseError(f"expected a scale set object, got {_describe(doc)}")
    if isinstance(_get(doc, "value"), list):
        raise ArmParseError(
            "this is a list response ({'value': [...]}), not one scale set; "
            "export a single scale set with `az vmss show` or a REST GET"
        )
    kind = _text(_get(doc, "type"))
    if kind is not None and kind.lower() != SCALE_SET_TYPE:
        raise ArmParseError(
            f"expected type Microsoft.Compute/virtualMachineScaleSets, got {kind!r} "
            f"({_describe(doc)})"
        )
    resource_id = _text(_get(doc, "id"))
    if not resource_id:
        raise ArmParseError("scale set has no 'id'; export it with `az vmss show` or a REST GET")
    try:
        ref = ScaleSetRef.parse(resource_id)
    except ValueError as error:
        raise ArmParseError(f"'id' is not a scale set resource id: {resource_id!r}") from error
    if ref.key != resource_id.rstrip("/").lower():
        raise ArmParseError(f"'id' names a resource below a scale set, not one: {resource_id!r}")

    sku = _get(doc, "sku")
    capacity = _get(sku, "capacity")
    policy = _prop(doc, "resiliencyPolicy", "automaticZoneRebalancingPolicy")
    return ScaleSet(
        ref=ref,
        location=_text(_get(doc, "location")) or "",
        zones=_zones(_get(doc, "zones")),
        sku_name=_text(_get(sku, "name")) or None,
        capacity=capacity if isinstance(capacity, int) and not isinstance(capacity, bool) else None,
        mode=_orchestration_mode(doc),
        provisioning_state=provisioning_state(_text(_prop(doc, "provisioningState"))),
        health_monitoring=_health_monitoring(doc),
        platform_rebalancing=_flag(_get(policy, "enabled")),
        tags=_tags(_get(doc, "tags")),
        zone_balance=_flag(_prop(doc, "zoneBalance")),
        terminate_notification=_terminate_notification(doc),
        etag=_text(_get(doc, "etag")) or None,
        upgrade_mode=_text(_prop(doc, "upgradePolicy", "mode")) or "Manual",
        automatic_os_upgrade=_flag(
            _prop(doc, "upgradePolicy", "automaticOSUpgradePolicy", "enableAutomaticOSUpgrade")
        ),
        automatic_repairs=_automatic_repairs(doc),
        spot=_is_spot(_prop(doc, "virtualMachineProfile", "priority")),
        eviction_policy=_text(_prop(doc, "virtualMachineProfile", "evictionPolicy")) or None,
        priority_mix=_priority_mix(doc),
        vm_sizes=_vm_sizes(doc),
    )


def parse_rolling_upgrade(doc: Mapping[str, Any]) -> RollingUpgrade:
    """The status of `GET .../rollingUpgrades/latest`.

    Raises ArmParseError when it has no `runningStatus.code`.
    """
    if not isinstance(doc, Mapping):
        raise ArmParseError(f"expected a rolling upgrade status object, got {_describe(doc)}")
    code = _text(_prop(doc, "runningStatus", "code"))
    if not code:
        raise ArmParseError("rolling upgrade status has no runningStatus.code")
    pending = _prop(doc, "progress", "pendingInstanceCount")
    in_progress = _prop(doc, "progress", "inProgressInstanceCount")
    return RollingUpgrade(
        status=code,
        started=parse_time(_prop(doc, "runningStatus", "startTime")),
        pending=pending if isinstance(pending, int) else 0,
        in_progress=in_progress if isinstance(in_progress, int) else 0,
    )


# --- instances --------------------------------------------------------------------------


def _statuses(instance_view: Any) -> tuple[dict[str, str], str | None]:
    """From `statuses[].code`: the first state of each group (`{"ProvisioningState":
    "succeeded", "PowerState": "running"}`), and the code of a `ProvisioningState/failed/<code>`
    (e.g. `VMExtensionProvisioningError`), if any."""
    codes: dict[str, str] = {}
    failure = None
    statuses = _get(instance_view, "statuses")
    for status in statuses if isinstance(statuses, list) else ():
        group, _, rest = (_text(_get(status, "code")) or "").partition("/")
        state, _, code = rest.partition("/")
        if rest and group not in codes:
            codes[group] = state
        if failure is None and group == "ProvisioningState" and state.lower() == "failed":
            failure = code or ""
    return codes, failure or None


_POWER_STATES = {state.value: state for state in PowerState}
_HEALTH = {health.value.lower(): health for health in Health}


def _power_state(value: str | None) -> PowerState:
    return _POWER_STATES.get(value.lower(), PowerState.UNKNOWN) if value else PowerState.UNKNOWN


def _display_power_state(doc: Mapping[str, Any], properties: Any) -> str | None:
    """`az vm list -d` prints no instance view, only `"powerState": "VM running"`."""
    text = _text(_field(doc, properties, "powerState"))
    return text.split()[-1] if text and text.split() else None


def _health(instance_view: Any) -> Health:
    code = _text(_path(instance_view, "vmHealth", "status", "code"))
    if not code:
        return Health.NOT_REPORTED
    value = code.partition("/")[2] if "/" in code else code
    return _HEALTH.get(value.lower(), Health.UNKNOWN)


def instance_view_health(instance_view: Mapping[str, Any]) -> Health:
    """A VM's health from its instance view (`GET .../instanceView`)."""
    return _health(instance_view)


def _instance_provisioning_state(
    doc: Mapping[str, Any], properties: Any, codes: Mapping[str, str]
) -> str:
    """The instance view's state, or the model's when there is no instance view.

    A model state of `Deleting` wins over an older instance view: a VM on its way out is
    neither capacity nor a source.
    """
    model_state = _text(_field(doc, properties, "provisioningState"))
    if model_state and model_state.lower() == "deleting":
        return "Deleting"
    return provisioning_state(codes.get("ProvisioningState") or model_state)


def _uniform_instance_id(doc: Mapping[str, Any], properties: Any) -> str | None:
    instance_id = _text(_get(doc, "instanceId")) or _text(_get(properties, "instanceId"))
    if instance_id:
        return instance_id
    resource_id = _text(_get(doc, "id")) or ""
    head, sep, tail = resource_id.rstrip("/").rpartition("/")
    if (
        sep
        and tail
        and head.lower().endswith("/virtualmachines")
        and "/virtualmachinescalesets/" in head.lower()
    ):
        return tail
    return None


def parse_instance(doc: Mapping[str, Any], mode: OrchestrationMode) -> Instance:
    """One VM from a VMSS-VM list (Uniform) or a VM list (Flexible), REST or az shape.

    Id: Uniform `instanceId` (or the last segment of `id`), Flexible `name`. Defaults: no
    zone -> None; no instance view -> the power state from `az vm list -d`'s `powerState`
    or unknown, health not reported, and the model's `provisioningState`; no
    `protectionPolicy` -> unprotected; no `latestModelApplied` -> True; unreadable
    `timeCreated` -> None.
    """
    if not isinstance(doc, Mapping):
        raise ArmParseError(f"expected a VM object, got {_describe(doc)}")
    mode = OrchestrationMode(mode)
    kind = _text(_get(doc, "type"))
    if kind is not None and kind.lower() not in VM_TYPES:
        raise ArmParseError(f"expected a VM, got a {kind} ({_describe(doc)})")
    name = _text(_get(doc, "name")) or ""
    properties = _get(doc, "properties")
    if mode is OrchestrationMode.UNIFORM:
        vm_id = _uniform_instance_id(doc, properties)
        if not vm_id:
            raise ArmParseError(
                f"VM has no 'instanceId' ({_describe(doc)}); export Uniform instances with "
                "`az vmss list-instances` or the VMSS VM list API"
            )
    else:
        vm_id = name
        if not vm_id:
            raise ArmParseError(f"Flexible VM has no 'name' ({_describe(doc)})")
    instance_view = _field(doc, properties, "instanceView")
    codes, failure = _statuses(instance_view)
    protection = _field(doc, properties, "protectionPolicy")
    latest = _field(doc, properties, "latestModelApplied")
    zones = _zones(_get(doc, "zones"))
    return Instance(
        id=vm_id,
        name=name or vm_id,
        zone=zones[0] if zones else None,
        provisioning_state=_instance_provisioning_state(doc, properties, codes),
        power_state=_power_state(codes.get("PowerState") or _display_power_state(doc, properties)),
        health=_health(instance_view),
        protect_from_scale_in=_flag(_get(protection, "protectFromScaleIn")),
        protect_from_scale_set_actions=_flag(_get(protection, "protectFromScaleSetActions")),
        latest_model=True if latest is None else _flag(latest),
        created=parse_time(_field(doc, properties, "timeCreated")),
        failure=failure,
        spot=_is_spot(_field(doc, properties, "priority")),
        in_standby_pool=_flag(_get(instance_view, "isVMInStandbyPool")),
    )


def instance_documents(doc: Any) -> list[Mapping[str, Any]]:
    """The VM objects of a bare JSON array or a list response `{"value": [...]}`."""
    items = doc
    if isinstance(doc, Mapping):
        items = _get(doc, "value")
        if not isinstance(items, list):
            raise ArmParseError(
                f"expected a JSON array of VMs or a list response {{'value': [...]}}, "
                f"got a single object ({_describe(doc)})"
            )
    if not isinstance(items, list):
        raise ArmParseError(f"expected a JSON array of VMs, got {_describe(doc)}")
    for position, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ArmParseError(f"VM list item {position} is {_describe(item)}, not an object")
    return items


def parse_instances(doc: Any, mode: OrchestrationMode) -> tuple[Instance, ...]:
    """All VMs of a bare array or a `{"value": [...]}` page (one page: follow `nextLink`
    before calling). Raises ArmParseError naming the item position when one is unreadable."""
    instances = []
    for position, item in enumerate(instance_documents(doc)):
        try:
            instances.append(parse_instance(item, mode))
        except ArmParseError as error:
            raise ArmParseError(f"VM list item {position}: {error}") from error
    return tuple(instances)


def instance_scale_set(doc: Mapping[str, Any]) -> ScaleSetRef | None:
    """The scale set a VM document names: `virtualMachineScaleSet.id` (Flexible) or the
    scale set part of a Uniform VM's own id. None when the document names none."""
    for candidate in (_text(_prop(doc, "virtualMachineScaleSet", "id")), _text(_get(doc, "id"))):
        if not candidate:
            continue
        try:
            return ScaleSetRef.parse(candidate)
        except ValueError:
            continue
    return None


def instance_belongs_to(doc: Mapping[str, Any], ref: ScaleSetRef) -> bool:
    """Whether a VM document belongs to the scale set `ref`.

    A Flexible VM must name the set in `virtualMachineScaleSet.id` (a standalone VM names
    none and does not belong); a Uniform VM's id lies below its scale set's id. A document
    with neither (hand-trimmed export) cannot be checked and is accepted.
    """
    owner = instance_scale_set(doc)
    if owner is not None:
        return owner == ref
    return not _text(_get(doc, "id"))
