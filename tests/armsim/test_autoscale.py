"""armsim's autoscale: settings served in the 2022-10-01 shape, and the engine on the clock.

The engine restores a manual capacity outside [minimum, maximum] on its next evaluation
(Microsoft's autoscale docs: "if you manually set the scale to eight instances, the autoscale
engine scales it back to six on its next run"), scales out on a met rule, waits out the rule's
cooldown, never passes the maximum, and its writes emit the events ARM emits, with the
autoscale service as caller: an outside change to the rebalancer.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests

from armsim import ArmSim, ScaleSetSpec, Scenario
from armsim.auth import make_token
from armsim.autoscale import AUTOSCALE_PRINCIPAL, EVALUATION_SECONDS
from rebalancer.events import Trigger, classify
from rebalancer.settings import load_settings

CPU_HIGH = {
    "metricTrigger": {
        "metricName": "Percentage CPU",
        "timeGrain": "PT1M",
        "statistic": "Average",
        "timeWindow": "PT5M",
        "timeAggregation": "Average",
        "operator": "GreaterThan",
        "threshold": 75.0,
        "dividePerInstance": False,
    },
    "scaleAction": {
        "direction": "Increase",
        "type": "ChangeCount",
        "value": "1",
        "cooldown": "PT5M",
    },
}


@pytest.fixture
def sim():
    spec = ScaleSetSpec("web", "rg-web", counts={"1": 2, "2": 2, "3": 2})
    with ArmSim.start(Scenario(scale_sets=(spec,))) as started:
        yield started


def web_id(sim: ArmSim) -> str:
    return sim.scale_set("rg-web", "web").id


def get(sim: ArmSim, path: str) -> requests.Response:
    token = make_token(sim.scenario.app_principal_id, sim.scenario.tenant_id)
    return requests.get(
        f"{sim.endpoint}/subscriptions/{sim.subscription_id}{path}",
        params={"api-version": "2022-10-01"},
        headers={"Authorization": f"Bearer {token}"},
        verify=sim.ca_cert_path,
        timeout=10,
    )


def test_settings_are_listed_by_subscription_and_read_one_by_one(sim):
    sim.autoscale.put("rg-web", "web-autoscale", target=web_id(sim), minimum=2, maximum=8)
    listed = get(sim, "/providers/Microsoft.Insights/autoscalesettings")
    assert listed.status_code == 200
    (setting,) = listed.json()["value"]
    assert setting["type"] == "Microsoft.Insights/autoscaleSettings"
    assert setting["properties"]["targetResourceUri"] == web_id(sim)
    assert setting["properties"]["profiles"][-1]["capacity"] == {
        "minimum": "2",
        "maximum": "8",
        "default": "2",
    }
    one = get(
        sim, "/resourceGroups/RG-WEB/providers/Microsoft.Insights/autoscalesettings/web-autoscale"
    )
    assert one.status_code == 200 and one.json() == setting
    missing = get(sim, "/resourceGroups/rg-web/providers/Microsoft.Insights/autoscalesettings/x")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "ResourceNotFound"


def test_a_manual_capacity_above_the_maximum_is_put_back_on_the_next_evaluation(sim):
    sim.autoscale.put("rg-web", "web-autoscale", target=web_id(sim), minimum=2, maximum=6)
    sim.actor.set_capacity("rg-web", "web", 8)
    sim.advance(65)  # the scale-out has finished; an evaluation meanwhile left it running
    assert sim.scale_set("rg-web", "web").capacity == 8
    sim.advance(EVALUATION_SECONDS)
    assert sim.scale_set("rg-web", "web").capacity == 6
    (action,) = sim.autoscale.actions
    assert (action.old_capacity, action.new_capacity) == (8, 6)


def test_a_manual_capacity_below_the_minimum_is_raised_to_it(sim):
    sim.autoscale.put("rg-web", "web-autoscale", target=web_id(sim), minimum=5, maximum=9)
    sim.actor.set_capacity("rg-web", "web", 3)
    sim.advance(EVALUATION_SECONDS + 90)
    web = sim.scale_set("rg-web", "web")
    assert web.capacity == 5
    assert sum(web.zone_counts().values()) == 5


def test_a_disabled_setting_changes_nothing(sim):
    sim.autoscale.put(
        "rg-web", "web-autoscale", target=web_id(sim), minimum=2, maximum=4, enabled=False
    )
    sim.advance(5 * EVALUATION_SECONDS)
    assert sim.scale_set("rg-web", "web").capacity == 6 and sim.autoscale.actions == []


def test_a_met_scale_out_rule_adds_a_vm_then_waits_its_cooldown_up_to_the_maximum(sim):
    sim.autoscale.put(
        "rg-web", "web-autoscale", target=web_id(sim), minimum=2, maximum=8, rules=(CPU_HIGH,)
    )
    sim.autoscale.set_metric(web_id(sim), "Percentage CPU", 60.0)
    sim.advance(3 * EVALUATION_SECONDS)
    assert sim.scale_set("rg-web", "web").capacity == 6  # rule not met
    sim.autoscale.set_metric(web_id(sim), "Percentage CPU", 90.0)
    sim.advance(EVALUATION_SECONDS)
    assert sim.scale_set("rg-web", "web").capacity == 7
    sim.advance(4 * EVALUATION_SECONDS)  # inside the rule's 5-minute cooldown
    assert sim.scale_set("rg-web", "web").capacity == 7
    sim.advance(2 * EVALUATION_SECONDS)
    assert sim.scale_set("rg-web", "web").capacity == 8
    sim.advance(20 * EVALUATION_SECONDS)
    assert sim.scale_set("rg-web", "web").capacity == 8  # the maximum
    assert [a.new_capacity for a in sim.autoscale.actions] == [7, 8]


def test_the_engines_writes_emit_events_naming_the_autoscale_service(sim):
    sim.autoscale.put("rg-web", "web-autoscale", target=web_id(sim), minimum=2, maximum=6)
    sim.actor.set_capacity("rg-web", "web", 8)
    sim.advance(3 * EVALUATION_SECONDS)  # scaled out, put back, the VMs deleted
    writes = [
        e
        for e in sim.events
        if e["data"]["operationName"] == "Microsoft.Compute/virtualMachineScaleSets/write"
    ]
    assert len(writes) == 2
    event = writes[-1]
    assert event["eventType"] == "Microsoft.Resources.ResourceWriteSuccess"
    data = event["data"]
    oid = "http://schemas.microsoft.com/identity/claims/objectidentifier"
    assert data["claims"][oid] == AUTOSCALE_PRINCIPAL
    assert data["authorization"]["evidence"]["principalType"] == "ServicePrincipal"
    assert data["httpRequest"]["method"] == "PATCH"
    settings = load_settings(
        {
            "REBALANCER_SUBSCRIPTION_ID": sim.subscription_id,
            "REBALANCER_APP_PRINCIPAL_ID": sim.scenario.app_principal_id,
        }
    )
    trigger = classify(
        event["id"], event["eventType"], event["subject"], event["eventTime"], data, settings
    )
    assert isinstance(trigger, Trigger) and trigger.outside


def test_a_fixed_date_profile_in_force_sets_its_own_limits(sim):
    now = sim.clock.now()
    launch = {
        "name": "launch",
        "capacity": {"minimum": "8", "maximum": "12", "default": "8"},
        "rules": [],
        "fixedDate": {
            "timeZone": "UTC",
            "start": (now - timedelta(hours=1)).isoformat(),
            "end": (now + timedelta(hours=1)).isoformat(),
        },
    }
    sim.autoscale.put(
        "rg-web", "web-autoscale", target=web_id(sim), minimum=2, maximum=6, profiles=(launch,)
    )
    sim.advance(EVALUATION_SECONDS)
    assert sim.scale_set("rg-web", "web").capacity == 8
    sim.advance(2 * 3600)  # the window is over: the default profile's maximum holds again
    assert sim.scale_set("rg-web", "web").capacity == 6


def test_a_fixed_date_without_an_offset_is_read_in_its_time_zone(sim):
    """Tokyo is UTC+9: a window written in Tokyo wall-clock time around Tokyo's now holds now
    (read as UTC it would start 8 hours from now)."""
    tokyo_now = sim.clock.now().replace(tzinfo=None) + timedelta(hours=9)
    launch = {
        "name": "launch",
        "capacity": {"minimum": "8", "maximum": "12", "default": "8"},
        "rules": [],
        "fixedDate": {
            "timeZone": "Tokyo Standard Time",
            "start": (tokyo_now - timedelta(hours=1)).isoformat(),
            "end": (tokyo_now + timedelta(hours=1)).isoformat(),
        },
    }
    sim.autoscale.put(
        "rg-web", "web-autoscale", target=web_id(sim), minimum=2, maximum=6, profiles=(launch,)
    )
    sim.advance(EVALUATION_SECONDS)
    assert sim.scale_set("rg-web", "web").capacity == 8
    sim.advance(2 * 3600)  # Tokyo's window is over
    assert sim.scale_set("rg-web", "web").capacity == 6


def test_a_malformed_fixed_date_is_refused_with_the_profile_named(sim):
    bad = {
        "name": "launch",
        "capacity": {"minimum": "1", "maximum": "2", "default": "1"},
        "fixedDate": {"timeZone": "UTC", "start": "soon", "end": "later"},
    }
    with pytest.raises(ValueError, match="profile 'launch' fixedDate"):
        sim.autoscale.put("rg-web", "a", target=web_id(sim), minimum=1, maximum=2, profiles=(bad,))
