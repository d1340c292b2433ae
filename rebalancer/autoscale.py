"""Autoscale settings (`Microsoft.Insights/autoscalesettings`): which limits hold a scale set now.

Pure: ARM JSON (api-version 2022-10-01) -> frozen values, the setting that targets a scale set
(`targetResourceUri`, compared case-insensitively), the profile in force at a given time, and
whether raising the capacity by k would cross that profile's maximum. Autoscale puts a capacity
outside [minimum, maximum] back on its next run, so such a move would only be undone.

Profiles apply in the documented order: a fixed-date profile whose window holds the time, else
the recurring profile that started last (a recurring profile runs until the next one starts),
else the default profile. Where the time cannot be placed (a time zone Python does not know,
a day name that is not a weekday), the profile counts as possibly in force and the lowest
maximum of the candidates is used: a skip costs nothing, a move over the maximum costs a VM
created and deleted for nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rebalancer.model import ScaleSetRef

REASON = "autoscale_at_maximum"
"""The reason code of a move skipped because autoscale would take its VMs back."""
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# Windows time zone names the portal writes, for the ones Python's zoneinfo spells differently.
_WINDOWS_ZONES = {
    "utc": "UTC",
    "coordinated universal time": "UTC",
    "gmt standard time": "Europe/London",
    "w. europe standard time": "Europe/Berlin",
    "central europe standard time": "Europe/Budapest",
    "romance standard time": "Europe/Paris",
    "pacific standard time": "America/Los_Angeles",
    "mountain standard time": "America/Denver",
    "central standard time": "America/Chicago",
    "eastern standard time": "America/New_York",
    "india standard time": "Asia/Kolkata",
    "tokyo standard time": "Asia/Tokyo",
    "aus eastern standard time": "Australia/Sydney",
}


class AutoscaleParseError(ValueError):
    """An autoscale setting document that is not one; the message names the field."""


@dataclass(frozen=True, slots=True)
class Recurrence:
    """A weekly start time: the profile runs from each start until another profile starts."""

    time_zone: str
    days: tuple[str, ...]
    hours: tuple[int, ...]
    minutes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    minimum: int
    maximum: int
    default: int
    fixed_start: datetime | None = None
    fixed_end: datetime | None = None
    fixed_time_zone: str | None = None
    recurrence: Recurrence | None = None

    @property
    def kind(self) -> str:
        if self.fixed_start is not None:
            return "fixed date"
        if self.recurrence is not None:
            return "recurring"
        return "default"


@dataclass(frozen=True, slots=True)
class AutoscaleSetting:
    id: str
    name: str
    target_resource_uri: str
    enabled: bool
    profiles: tuple[Profile, ...]

    def targets(self, ref: ScaleSetRef) -> bool:
        return self.target_resource_uri.rstrip("/").lower() == ref.key


@dataclass(frozen=True, slots=True)
class AtMaximum:
    """A scale-out of k would pass the maximum of the profile in force."""

    setting: AutoscaleSetting
    profile: Profile
    capacity: int
    k: int

    def describe(self) -> str:
        return (
            f"autoscale setting {self.setting.name} ({self.profile.kind} profile "
            f"'{self.profile.name}') allows at most {self.profile.maximum} VMs; capacity "
            f"{self.capacity} + {self.k} would pass it and autoscale would take the VM(s) back. "
            f"Raise the profile's maximum (or disable the setting: {self.setting.id}) to let "
            "the rebalancer move VMs"
        )


# --- parsing ----------------------------------------------------------------------------


def parse_settings(documents: Iterable[Mapping[str, Any]]) -> tuple[AutoscaleSetting, ...]:
    """REST documents of a list -> settings; one unreadable document raises naming it."""
    return tuple(parse_setting(doc) for doc in documents)


def parse_setting(doc: Mapping[str, Any]) -> AutoscaleSetting:
    if not isinstance(doc, Mapping):
        raise AutoscaleParseError(f"an autoscale setting must be a JSON object, got {doc!r}")
    props = doc.get("properties")
    if not isinstance(props, Mapping):
        raise AutoscaleParseError(f"autoscale setting {doc.get('id')!r} has no properties")
    name = str(doc.get("name") or props.get("name") or "")
    where = str(doc.get("id") or name)
    target = props.get("targetResourceUri")
    if not isinstance(target, str) or not target:
        raise AutoscaleParseError(f"autoscale setting {where}: targetResourceUri is missing")
    profiles = props.get("profiles")
    if not isinstance(profiles, list) or not profiles:
        raise AutoscaleParseError(f"autoscale setting {where}: profiles are missing")
    enabled = props.get("enabled")
    return AutoscaleSetting(
        id=where,
        name=name or where,
        target_resource_uri=target,
        # The REST specification: "The default value is 'false'".
        enabled=enabled is True or str(enabled).lower() == "true",
        profiles=tuple(_profile(p, f"{where} profile {i}") for i, p in enumerate(profiles)),
    )


def _count(capacity: Mapping[str, Any], key: str, where: str) -> int:
    value = capacity.get(key)
    try:
        return int(str(value))
    except ValueError:
        raise AutoscaleParseError(f"{where}: capacity.{key} {value!r} is not a count") from None


def _profile(doc: Any, where: str) -> Profile:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("capacity"), Mapping):
        raise AutoscaleParseError(f"{where}: capacity is missing")
    capacity = doc["capacity"]
    fixed = doc.get("fixedDate") if isinstance(doc.get("fixedDate"), Mapping) else None
    recurrence = doc.get("recurrence") if isinstance(doc.get("recurrence"), Mapping) else None
    profile = Profile(
        name=str(doc.get("name") or where),
        minimum=_count(capacity, "minimum", where),
        maximum=_count(capacity, "maximum", where),
        default=_count(capacity, "default", where),
    )
    if fixed is not None:
        return Profile(
            **_fields(profile),
            fixed_start=_instant(fixed.get("start"), f"{where} fixedDate.start"),
            fixed_end=_instant(fixed.get("end"), f"{where} fixedDate.end"),
            fixed_time_zone=str(fixed.get("timeZone") or "UTC"),
        )
    if recurrence is not None:
        schedule = recurrence.get("schedule") or {}
        try:
            hours = tuple(int(h) for h in schedule.get("hours") or (0,))
            minutes = tuple(int(m) for m in schedule.get("minutes") or (0,))
        except (TypeError, ValueError):
            raise AutoscaleParseError(
                f"{where}: recurrence hours {schedule.get('hours')!r} and minutes "
                f"{schedule.get('minutes')!r} must be whole numbers"
            ) from None
        return Profile(
            **_fields(profile),
            recurrence=Recurrence(
                time_zone=str(schedule.get("timeZone") or "UTC"),
                days=tuple(str(d) for d in schedule.get("days") or ()),
                hours=hours,
                minutes=minutes,
            ),
        )
    return profile


def _fields(profile: Profile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "minimum": profile.minimum,
        "maximum": profile.maximum,
        "default": profile.default,
    }


def _instant(value: Any, where: str) -> datetime:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise AutoscaleParseError(f"{where}: {value!r} is not a date and time") from None


# --- which profile holds now ------------------------------------------------------------


def setting_for(settings: Iterable[AutoscaleSetting], ref: ScaleSetRef) -> AutoscaleSetting | None:
    """The enabled setting that targets the scale set (Azure allows one per resource)."""
    return next((s for s in settings if s.enabled and s.targets(ref)), None)


def _zone(name: str | None) -> tzinfo | None:
    if not name:
        return UTC
    try:
        return ZoneInfo(_WINDOWS_ZONES.get(name.strip().lower(), name.strip()))
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _fixed_holds(profile: Profile, now: datetime) -> bool | None:
    """Whether the fixed-date window holds `now`; None when its time zone is unknown."""
    zone = _zone(profile.fixed_time_zone)
    assert profile.fixed_start is not None and profile.fixed_end is not None
    start, end = profile.fixed_start, profile.fixed_end
    if start.tzinfo is None or end.tzinfo is None:
        if zone is None:
            return None
        start, end = (
            start.replace(tzinfo=start.tzinfo or zone),
            end.replace(tzinfo=end.tzinfo or zone),
        )
    return start <= now <= end


def _last_start(recurrence: Recurrence, now: datetime) -> datetime | None:
    """The latest weekly start at or before `now`; None when the schedule cannot be placed."""
    zone = _zone(recurrence.time_zone)
    days = [d.strip().lower() for d in recurrence.days]
    if zone is None or not days or any(d not in _WEEKDAYS for d in days):
        return None
    local = now.astimezone(zone)
    latest: datetime | None = None
    for back in range(8):
        day = local - timedelta(days=back)
        if _WEEKDAYS[day.weekday()] not in days:
            continue
        for hour in recurrence.hours:
            for minute in recurrence.minutes:
                start = day.replace(hour=hour, minute=minute, second=0, microsecond=0)
                if start <= local and (latest is None or start > latest):
                    latest = start
    return latest


def candidate_profiles(setting: AutoscaleSetting, now: datetime) -> tuple[Profile, ...]:
    """The profile in force at `now`, or every profile that may be when one cannot be placed."""
    unsure: list[Profile] = []
    for profile in setting.profiles:
        if profile.fixed_start is None:
            continue
        holds = _fixed_holds(profile, now)
        if holds:
            return (profile, *unsure)
        if holds is None:
            unsure.append(profile)
    recurring = [p for p in setting.profiles if p.recurrence is not None]
    starts = [(p, _last_start(p.recurrence, now)) for p in recurring if p.recurrence]
    unsure += [p for p, start in starts if start is None]
    placed = [(p, start) for p, start in starts if start is not None]
    if placed:
        return (max(placed, key=lambda pair: pair[1])[0], *unsure)
    defaults = [p for p in setting.profiles if p.fixed_start is None and p.recurrence is None]
    return (*defaults[:1], *unsure) if defaults or unsure else setting.profiles[:1]


def at_maximum(
    settings: Iterable[AutoscaleSetting], ref: ScaleSetRef, capacity: int, k: int, now: datetime
) -> AtMaximum | None:
    """Why capacity + k would be taken back by autoscale, or None when it fits."""
    setting = setting_for(settings, ref)
    if setting is None or k <= 0:
        return None
    profile = min(candidate_profiles(setting, now), key=lambda p: p.maximum)
    if capacity + k > profile.maximum:
        return AtMaximum(setting, profile, capacity, k)
    return None
