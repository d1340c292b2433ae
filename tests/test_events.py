"""Event classification on the documented payloads, decoded as the Functions host decodes them."""

import json
from pathlib import Path

import azure.functions as func
import pytest
from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.meta import Datum

from rebalancer.azure_operations import HANDLED_OPERATION_NAMES
from rebalancer.events import Change, Ignored, Trigger, classify
from rebalancer.model import OutsideChange, ScaleSetRef
from rebalancer.settings import load_settings

EVENTS = Path(__file__).parent / "data" / "events"
SUB = "5e8a1b2c-3d4e-4f50-8a61-7b8c9d0e1f2a"
APP_PRINCIPAL = "11111111-2222-4333-8444-555555555555"


def settings(**extra):
    env = {"REBALANCER_SUBSCRIPTION_ID": SUB, "REBALANCER_APP_PRINCIPAL_ID": APP_PRINCIPAL}
    env.update(extra)
    return load_settings(env)


def decoded(name: str) -> func.EventGridEvent:
    (payload,) = json.loads((EVENTS / name).read_text())
    return EventGridEventInConverter.decode(Datum(json.dumps(payload), "json"), trigger_metadata={})


def classify_event(event: func.EventGridEvent, config=None):
    return classify(
        event.id,
        event.event_type,
        event.subject,
        event.event_time,
        event.get_json(),
        config or settings(),
    )


@pytest.mark.parametrize(
    ("name", "change", "size_change"),
    [
        ("vmss-write-capacity.json", Change.SCALE_SET_WRITE, OutsideChange.CAPACITY_WRITE),
        ("vmss-delete-instances.json", Change.INSTANCES_DELETED, OutsideChange.VM_DELETE),
        ("vmss-vm-delete.json", Change.INSTANCE_DELETED, OutsideChange.VM_DELETE),
    ],
)
def test_scale_set_events_map_to_their_scale_set(name, change, size_change):
    result = classify_event(decoded(name))
    assert isinstance(result, Trigger)
    assert result.change is change
    assert result.size_change is size_change
    assert result.ref == ScaleSetRef(SUB, "RG-WEB", "web")
    assert result.outside
    assert result.at is not None and result.at.year == 2026


def test_flexible_vm_delete_points_at_its_scale_set_by_name():
    result = classify_event(decoded("flexible-vm-delete.json"))
    assert isinstance(result, Trigger)
    assert result.change is Change.INSTANCE_DELETED
    assert result.flexible_vm == "api_3f9a2c1e"
    assert result.ref == ScaleSetRef(SUB, "rg-api", "api")


def test_unrelated_event_is_ignored_with_a_reason():
    result = classify_event(decoded("unrelated-storage-write.json"))
    assert isinstance(result, Ignored)
    assert "Microsoft.Storage/storageAccounts/write" in result.reason


def test_the_apps_own_writes_are_not_outside_activity():
    event = decoded("vmss-write-capacity.json")
    caller = event.get_json()["claims"][
        "http://schemas.microsoft.com/identity/claims/objectidentifier"
    ]
    result = classify_event(event, settings(REBALANCER_APP_PRINCIPAL_ID=caller))
    assert isinstance(result, Trigger)
    assert not result.outside


def test_out_of_scope_resource_group_is_ignored():
    result = classify_event(
        decoded("vmss-write-capacity.json"), settings(REBALANCER_RESOURCE_GROUPS="rg-api")
    )
    assert isinstance(result, Ignored)
    assert "outside the configured scope" in result.reason


def test_other_subscription_is_ignored():
    other = settings(REBALANCER_SUBSCRIPTION_ID="00000000-0000-4000-8000-000000000000")
    assert isinstance(classify_event(decoded("vmss-write-capacity.json"), other), Ignored)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.pop("data"),
        lambda e: e.update(data="text"),
        lambda e: e["data"].update(operationName=42),
        lambda e: e["data"].update(
            resourceUri="/subscriptions/x", operationName=HANDLED_OPERATION_NAMES[0]
        ),
        lambda e: e["data"].update(resourceUri="/" + "a" * 5000),
        lambda e: e.update(eventType="Microsoft.Resources.ResourceWriteFailure"),
        lambda e: e.update(eventType=None),
    ],
)
def test_malformed_events_are_ignored_not_raised(mutate):
    (payload,) = json.loads((EVENTS / "vmss-write-capacity.json").read_text())
    mutate(payload)
    result = classify(
        payload.get("id"),
        payload.get("eventType"),
        payload.get("subject"),
        payload.get("eventTime"),
        payload.get("data"),
        settings(),
    )
    assert isinstance(result, Ignored)
    assert result.reason


@pytest.mark.parametrize("operation", HANDLED_OPERATION_NAMES)
def test_every_handled_operation_classifies(operation):
    (payload,) = json.loads((EVENTS / "vmss-write-capacity.json").read_text())
    payload["data"]["operationName"] = operation.upper()
    result = classify(
        payload["id"],
        payload["eventType"],
        payload["subject"],
        payload["eventTime"],
        payload["data"],
        settings(),
    )
    assert isinstance(result, Trigger)
    assert result.operation_name == operation.upper()


def test_cloud_events_schema_delivery_classifies_like_the_event_grid_schema():
    """An event subscription set to CloudEvents 1.0 hands the function a CloudEvent."""
    from rebalancer.events import envelope

    (payload,) = json.loads((EVENTS / "vmss-write-capacity.json").read_text())
    cloud = {
        "specversion": "1.0",
        "id": payload["id"],
        "source": payload["topic"],
        "subject": payload["subject"],
        "type": payload["eventType"],
        "time": payload["eventTime"],
        "data": payload["data"],
    }
    event = EventGridEventInConverter.decode(Datum(json.dumps(cloud), "json"), trigger_metadata={})
    assert not hasattr(event, "event_type")
    result = classify(*envelope(event), settings())
    assert isinstance(result, Trigger)
    assert result.ref == ScaleSetRef(SUB, "rg-web", "web")
    assert envelope(event)[0] == envelope(decoded("vmss-write-capacity.json"))[0]


def test_an_id_less_event_is_keyed_by_its_content():
    (payload,) = json.loads((EVENTS / "vmss-write-capacity.json").read_text())

    def key(subject: str) -> str:
        data = {**payload["data"], "resourceUri": subject}
        result = classify(None, payload["eventType"], subject, None, data, settings())
        assert isinstance(result, Trigger)
        return result.dedupe_key

    other = payload["subject"].replace("/web", "/api")
    assert key(payload["subject"]) == key(payload["subject"])
    assert key(payload["subject"]) != key(other)


def test_the_apps_principal_matches_in_any_spelling():
    (payload,) = json.loads((EVENTS / "vmss-write-capacity.json").read_text())
    data = payload["data"]
    data["claims"] = {}
    data["authorization"]["evidence"]["principalId"] = "{" + APP_PRINCIPAL.replace("-", "") + "}"
    result = classify("x", payload["eventType"], payload["subject"], None, data, settings())
    assert isinstance(result, Trigger) and not result.outside


def test_an_id_that_would_not_fit_a_table_key_encoded_is_keyed_by_a_hash():
    (payload,) = json.loads((EVENTS / "vmss-write-capacity.json").read_text())
    wide = "\U0001f600" * 200  # 200 characters, 2,400 once percent-encoded
    args = (payload["eventType"], payload["subject"], None, payload["data"], settings())
    result = classify(wide, *args)
    assert isinstance(result, Trigger)
    assert result.dedupe_key.startswith("sha256:") and len(result.dedupe_key) < 80
    assert classify(wide, *args).dedupe_key == result.dedupe_key
    assert classify(payload["id"], *args).dedupe_key == payload["id"]
