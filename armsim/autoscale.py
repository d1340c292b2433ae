"""Autoscale settings (`Microsoft.Insights/autoscalesettings`) and the autoscale engine.

Settings are kept in the REST shape of api-version 2022-10-01 and served by list (subscription)
and get. The engine evaluates every enabled setting on armsim's clock, every
`EVALUATION_SECONDS`: a capacity outside the profile's [minimum, maximum] is put back to the
nearest limit; inside, the metric rules scale (any scale-out rule met: scale out; every
scale-in rule met: scale in), within the limits, and a rule's cooldown holds further actions.
Metrics are what the test sets with `set_metric`. The engine's writes go through the same code
as requests, as the autoscale service's principal, so they take time, preempt and emit the
Event Grid events ARM would.

Profiles in force: fixed-date profiles first (a start or end without an offset is read in the
profile's `timeZone`, UTC when it has none), then the default profile; recurring profiles are
not modelled.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from armsim.errors import ArmError
from armsim.resources import Caller
from armsim.scenario import parse_iso_duration

if TYPE_CHECKING:
    from armsim.simulator import ArmSim
    from armsim.world import World

AUTOSCALE_TYPE = "Microsoft.Insights/autoscaleSettings"
AUTOSCALE_PRINCIPAL = "d2a9c6e1-3333-4444-8555-666677778888"
"""Object id armsim gives the autoscale service's principal (the docs do not name one)."""
EVALUATION_SECONDS = 60.0
API_VERSION = "2022-10-01"


@dataclass(frozen=True, slots=True)
class AutoscaleAction:
    """One write the engine made: when, to which scale set, from and to which capacity."""

    time: datetime
    setting: str
    scale_set_id: str
    old_capacity: int
    new_capacity: int
    reason: str


class Autoscale:
    """The settings of one simulated subscription and their engine (owned by `ArmSim`)."""

    def __init__(self, sim: ArmSim) -> None:
        self._sim = sim
        self._settings: dict[str, dict[str, Any]] = {}
        self._metrics: dict[tuple[str, str], float] = {}
        self._cooldown_until: dict[str, datetime] = {}
        self._scheduled = False
        self.actions: list[AutoscaleAction] = []
        """Every write the engine made, oldest first."""

    # --- settings ---------------------------------------------------------------------

    def put(
        self,
        resource_group: str,
        name: str,
        *,
        target: str,
        minimum: int,
        maximum: int,
        default: int | None = None,
        rules: tuple[Mapping[str, Any], ...] = (),
        enabled: bool = True,
        profiles: tuple[Mapping[str, Any], ...] = (),
        location: str = "westeurope",
    ) -> dict[str, Any]:
        """Create or replace a setting (no event: as seeded). `target` is a scale set's
        resource id; `rules` are REST `rules` items; `profiles` add fixed-date profiles."""
        if not 0 <= minimum <= maximum:
            raise ValueError(
                f"autoscale {name}: need 0 <= minimum <= maximum, got {minimum}, {maximum}"
            )
        for extra in profiles:
            fixed = extra.get("fixedDate")
            try:
                if fixed and _instant(fixed, "start") > _instant(fixed, "end"):
                    raise ValueError("the window ends before it starts")
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"autoscale {name}: profile {extra.get('name')!r} fixedDate {fixed!r}: "
                    f"{error}; give ISO 8601 start and end"
                ) from None
        world = self._sim.world
        sub = self._sim.subscription_id
        default_profile = {
            "name": "Auto created default scale condition",
            "capacity": {
                "minimum": str(minimum),
                "maximum": str(maximum),
                "default": str(minimum if default is None else default),
            },
            "rules": [copy.deepcopy(dict(rule)) for rule in rules],
        }
        document = {
            "id": f"/subscriptions/{sub}/resourceGroups/{resource_group}/providers/"
            f"microsoft.insights/autoscalesettings/{name}",
            "name": name,
            "type": AUTOSCALE_TYPE,
            "location": location,
            "tags": {},
            "properties": {
                "profiles": [*(copy.deepcopy(dict(p)) for p in profiles), default_profile],
                "enabled": enabled,
                "predictiveAutoscalePolicy": {"scaleMode": "Disabled"},
                "name": name,
                "targetResourceUri": target,
                "notifications": [],
            },
        }
        with world.lock:
            world.resource_groups.setdefault(resource_group.lower(), resource_group)
            self._settings[f"{resource_group}/{name}".lower()] = document
            if not self._scheduled:
                self._scheduled = True
                world.after(world.now, EVALUATION_SECONDS, self._evaluate_all)
        return copy.deepcopy(document)

    def set_enabled(self, resource_group: str, name: str, enabled: bool) -> None:
        with self._sim.world.lock:
            self._document(resource_group, name)["properties"]["enabled"] = enabled

    def set_metric(self, target: str, metric: str, value: float) -> None:
        """The value the engine reads for `metric` of `target` (a resource id) from now on."""
        with self._sim.world.lock:
            self._metrics[(target.lower(), metric.lower())] = value

    def documents(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(doc) for doc in self._settings.values()]

    def get(self, resource_group: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self._document(resource_group, name))

    def _document(self, resource_group: str, name: str) -> dict[str, Any]:
        doc = self._settings.get(f"{resource_group}/{name}".lower())
        if doc is None:
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource '{AUTOSCALE_TYPE}/{name}' under resource group "
                f"'{resource_group}' was not found.",
            )
        return doc

    # --- the engine -------------------------------------------------------------------

    def _evaluate_all(self, at: datetime) -> None:
        world = self._sim.world
        for key, document in list(self._settings.items()):
            self._evaluate(world, key, document, at)
        world.after(at, EVALUATION_SECONDS, self._evaluate_all)

    def _evaluate(self, world: World, key: str, document: dict[str, Any], at: datetime) -> None:
        props = document["properties"]
        if props.get("enabled") is not True:
            return
        ss = _target(world, str(props.get("targetResourceUri", "")))
        if ss is None or ss.provisioning_state not in ("Succeeded", "Updating"):
            return
        if ss.model_op is not None and not ss.model_op.done:
            return  # a scale operation is running; the next evaluation looks again
        profile = _profile_in_force(props["profiles"], at)
        capacity = profile["capacity"]
        low, high = int(capacity["minimum"]), int(capacity["maximum"])
        current = ss.capacity
        if current < low or current > high:
            target, reason = min(max(current, low), high), "outside [minimum, maximum]"
        elif self._cooldown_until.get(key, at) > at:
            return
        else:
            target, reason, cooldown = self._by_rules(ss.resource_id, profile, current)
            target = min(max(target, low), high)
            if target != current:
                self._cooldown_until[key] = at + timedelta(seconds=cooldown)
        if target == current:
            return
        caller = _autoscale_caller(world, ss.resource_id)
        world.update_scale_set(ss, {"sku": {"capacity": target}}, caller)
        self.actions.append(
            AutoscaleAction(at, document["name"], ss.resource_id, current, target, reason)
        )

    def _by_rules(
        self, target_id: str, profile: Mapping[str, Any], current: int
    ) -> tuple[int, str, float]:
        out: list[tuple[int, float]] = []
        ins: list[tuple[int, float]] = []
        scale_in_rules = 0
        for rule in profile.get("rules") or ():
            trigger, action = rule.get("metricTrigger") or {}, rule.get("scaleAction") or {}
            direction = str(action.get("direction", "")).lower()
            met = self._met(target_id, trigger)
            changed = _apply(action, current)
            cooldown = float(parse_iso_duration(str(action.get("cooldown") or "PT5M")))
            if direction == "increase" and met:
                out.append((changed, cooldown))
            elif direction == "decrease":
                scale_in_rules += 1
                if met:
                    ins.append((changed, cooldown))
        if out:
            # Several scale-out rules met: the one that adds the most wins.
            target, cooldown = max(out)
            return target, "scale-out rule met", cooldown
        if ins and len(ins) == scale_in_rules:
            target, cooldown = max(ins)  # the one that removes the fewest
            return target, "every scale-in rule met", cooldown
        return current, "", 0.0

    def _met(self, target_id: str, trigger: Mapping[str, Any]) -> bool:
        resource = str(trigger.get("metricResourceUri") or target_id).lower()
        value = self._metrics.get((resource, str(trigger.get("metricName", "")).lower()))
        if value is None:
            return False
        threshold = float(trigger.get("threshold", 0))
        return {
            "greaterthan": value > threshold,
            "greaterthanorequal": value >= threshold,
            "lessthan": value < threshold,
            "lessthanorequal": value <= threshold,
            "equals": value == threshold,
            "notequals": value != threshold,
        }.get(str(trigger.get("operator", "")).lower(), False)


def _apply(action: Mapping[str, Any], current: int) -> int:
    value = int(str(action.get("value") or "1"))
    sign = 1 if str(action.get("direction", "")).lower() == "increase" else -1
    kind = str(action.get("type", "ChangeCount")).lower()
    if kind == "exactcount":
        return value
    if kind == "percentchangecount":
        return current + sign * max(1, round(current * value / 100))
    return current + sign * value


def _profile_in_force(profiles: list[Mapping[str, Any]], at: datetime) -> Mapping[str, Any]:
    for profile in profiles:
        fixed = profile.get("fixedDate")
        if fixed and _instant(fixed, "start") <= at <= _instant(fixed, "end"):
            return profile
    plain = [p for p in profiles if not p.get("fixedDate") and not p.get("recurrence")]
    return plain[0] if plain else profiles[-1]


# The portal writes Windows time zone names; the ones zoneinfo spells differently
# (https://learn.microsoft.com/azure/azure-monitor/autoscale/autoscale-understanding-settings:
# "timeZone": "Pacific Standard Time").
_WINDOWS_ZONES = {
    "coordinated universal time": "UTC",
    "gmt standard time": "Europe/London",
    "w. europe standard time": "Europe/Berlin",
    "romance standard time": "Europe/Paris",
    "pacific standard time": "America/Los_Angeles",
    "eastern standard time": "America/New_York",
    "tokyo standard time": "Asia/Tokyo",
}


def _instant(fixed: Mapping[str, Any], key: str) -> datetime:
    """A fixed date's start or end; a time without an offset is in the profile's timeZone."""
    moment = datetime.fromisoformat(str(fixed.get(key)).replace("Z", "+00:00"))
    if moment.tzinfo is not None:
        return moment
    name = str(fixed.get("timeZone") or "UTC").strip()
    try:
        zone = ZoneInfo(_WINDOWS_ZONES.get(name.lower(), name))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timeZone {name!r}") from None
    return moment.replace(tzinfo=zone)


def _target(world: World, resource_id: str) -> Any:
    parts = resource_id.strip("/").split("/")
    if len(parts) != 8 or parts[6].lower() != "virtualmachinescalesets":
        return None
    ss = world.scale_sets.get(f"{parts[3]}/{parts[7]}".lower())
    return None if ss is None or ss.deleted else ss


def _autoscale_caller(world: World, resource_id: str) -> Caller:
    return Caller(
        principal_id=AUTOSCALE_PRINCIPAL,
        claims={"idtyp": "app", "name": "Microsoft.Insights/autoscaleSettings"},
        method="PATCH",
        url=f"https://management.azure.com{resource_id}?api-version=2024-07-01",
        client_request_id=world.new_id(),
        correlation_id=world.new_id(),
        client_ip="",
    )
