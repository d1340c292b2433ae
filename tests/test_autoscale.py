"""The pure autoscale logic: parsing the REST shape, matching a scale set, the profile in force."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rebalancer.autoscale import (
    AutoscaleParseError,
    at_maximum,
    candidate_profiles,
    parse_setting,
    parse_settings,
    setting_for,
)
from rebalancer.model import ScaleSetRef

EXAMPLE = Path(__file__).parent / "data" / "arm-examples" / "listAutoscaleSetting.json"
REF = ScaleSetRef("sub", "rg-web", "web")
# A Thursday.
NOW = datetime(2026, 11, 19, 12, 0, tzinfo=UTC)


def profile(name, minimum, maximum, **extra):
    return {
        "name": name,
        "capacity": {"minimum": str(minimum), "maximum": str(maximum), "default": str(minimum)},
        "rules": [],
        **extra,
    }


def setting(*profiles, enabled=True, target=None):
    return parse_setting(
        {
            "id": "/subscriptions/sub/resourceGroups/rg-web/providers/microsoft.insights/"
            "autoscalesettings/web-autoscale",
            "name": "web-autoscale",
            "properties": {
                "enabled": enabled,
                "targetResourceUri": target or REF.id,
                "profiles": list(profiles),
            },
        }
    )


def test_the_rest_examples_list_parses_with_its_profiles_and_target():
    body = json.loads(EXAMPLE.read_text())["responses"]["200"]["body"]
    (parsed,) = parse_settings(body["value"])
    assert parsed.name == "MySetting" and parsed.enabled
    assert parsed.target_resource_uri.endswith("/virtualMachineScaleSets/testingsc")
    assert [(p.name, p.kind, p.minimum, p.maximum) for p in parsed.profiles] == [
        ("adios", "fixed date", 1, 10),
        ("saludos", "recurring", 1, 10),
    ]


def test_the_target_matches_case_insensitively_and_only_when_enabled():
    upper = setting(profile("default", 2, 7), target=REF.id.upper())
    assert setting_for([upper], REF) is upper
    assert setting_for([setting(profile("d", 2, 7), enabled=False)], REF) is None
    other = setting(profile("d", 2, 7), target=REF.id.replace("/web", "/api"))
    assert setting_for([other], REF) is None


def test_capacity_plus_k_over_the_maximum_is_reported_with_the_setting():
    settings = [setting(profile("default", 2, 7))]
    assert at_maximum(settings, REF, 6, 1, NOW) is None
    found = at_maximum(settings, REF, 7, 1, NOW)
    assert found is not None and found.profile.maximum == 7
    text = found.describe()
    assert "web-autoscale" in text and "at most 7 VMs" in text and "7 + 1" in text
    assert at_maximum(settings, REF, 6, 2, NOW) is not None


def test_a_fixed_date_profile_holds_only_inside_its_window():
    launch = profile(
        "launch",
        10,
        20,
        fixedDate={
            "timeZone": "UTC",
            "start": "2026-11-19T00:00:00Z",
            "end": "2026-11-20T00:00:00Z",
        },
    )
    parsed = setting(launch, profile("default", 2, 7))
    assert [p.name for p in candidate_profiles(parsed, NOW)] == ["launch"]
    later = datetime(2026, 11, 21, tzinfo=UTC)
    assert [p.name for p in candidate_profiles(parsed, later)] == ["default"]


def test_the_recurring_profile_that_started_last_holds():
    weekdays = profile(
        "weekdays",
        4,
        12,
        recurrence={
            "frequency": "Week",
            "schedule": {"timeZone": "UTC", "days": ["Monday"], "hours": [6], "minutes": [0]},
        },
    )
    weekend = profile(
        "weekend",
        1,
        3,
        recurrence={
            "frequency": "Week",
            "schedule": {"timeZone": "UTC", "days": ["Saturday"], "hours": [0], "minutes": [0]},
        },
    )
    parsed = setting(weekdays, weekend, profile("default", 2, 7))
    assert [p.name for p in candidate_profiles(parsed, NOW)] == ["weekdays"]
    sunday = datetime(2026, 11, 22, 12, tzinfo=UTC)
    assert [p.name for p in candidate_profiles(parsed, sunday)] == ["weekend"]


def test_a_profile_whose_time_cannot_be_placed_counts_with_its_lower_maximum():
    odd = profile(
        "odd",
        1,
        5,
        fixedDate={
            "timeZone": "Nowhere Standard Time",
            "start": "2026-11-19T00:00:00",
            "end": "2026-11-20T00:00:00",
        },
    )
    parsed = setting(odd, profile("default", 2, 9))
    found = at_maximum([parsed], REF, 6, 1, NOW)
    assert found is not None and found.profile.name == "odd"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"properties": {"profiles": []}}, "targetResourceUri is missing"),
        ({"id": "x", "properties": {"targetResourceUri": REF.id}}, "profiles are missing"),
        (
            {"id": "x", "properties": {"targetResourceUri": REF.id, "profiles": [
                {"name": "p", "capacity": {"minimum": "one", "maximum": "2", "default": "1"}}
            ]}},
            "capacity.minimum 'one' is not a count",
        ),
        (
            {"id": "x", "properties": {"targetResourceUri": REF.id, "profiles": [
                {"name": "p", "capacity": {"minimum": "1", "maximum": "2", "default": "1"},
                 "recurrence": {"frequency": "Week", "schedule": {"days": ["Monday"],
                                                                  "hours": ["noon"]}}}
            ]}},
            "recurrence hours \\['noon'\\]",
        ),
    ],
)  # fmt: skip
def test_an_unreadable_setting_names_what_is_wrong(document, message):
    with pytest.raises(AutoscaleParseError, match=message):
        parse_setting(document)
