"""Event Grid events: one per finished write/delete/action, with the caller's object id."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.meta import Datum
from azure.mgmt.compute.models import (
    Sku,
    VirtualMachineScaleSetUpdate,
    VirtualMachineScaleSetVMInstanceRequiredIDs,
)

from armsim import ArmSim
from armsim.events import OBJECT_ID_CLAIM

from .conftest import SimFactory, web_scenario

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "events"


def keys(value: Any, prefix: str = "") -> set[str]:
    if not isinstance(value, dict):
        return set()
    found = set()
    for key, inner in value.items():
        if key == "claims":
            found.add(f"{prefix}{key}")
            continue
        found.add(f"{prefix}{key}")
        found |= keys(inner, f"{prefix}{key}.")
    return found


def test_capacity_write_emits_write_success_when_the_operation_ends(sim: ArmSim, compute) -> None:
    received: list[dict[str, Any]] = []
    sim.on_event = received.append
    compute.virtual_machine_scale_sets.begin_update(
        "rg-web", "web", VirtualMachineScaleSetUpdate(sku=Sku(capacity=14))
    )
    assert received == []
    sim.clock.advance(60)
    assert len(received) == 1
    event = received[0]
    assert event["eventType"] == "Microsoft.Resources.ResourceWriteSuccess"
    assert event["data"]["operationName"] == "Microsoft.Compute/virtualMachineScaleSets/write"
    assert event["subject"].lower() == sim.scale_set("rg-web", "web").id.lower()
    assert "/resourcegroups/" in event["subject"]
    assert event["data"]["claims"][OBJECT_ID_CLAIM] == sim.scenario.app_principal_id
    assert event["data"]["httpRequest"]["method"] == "PATCH"
    assert event["topic"] == f"/subscriptions/{sim.subscription_id}"
    assert event["eventTime"].startswith("2026-11-20T09:01:00")


def test_envelope_and_data_have_every_key_of_the_documented_samples(sim: ArmSim, compute) -> None:
    compute.virtual_machine_scale_sets.begin_delete_instances(
        "rg-web", "web", VirtualMachineScaleSetVMInstanceRequiredIDs(instance_ids=["0"])
    )
    sim.clock.advance(60)
    ours = sim.events[-1]
    sample = json.loads((SAMPLES / "vmss-delete-instances.json").read_text())[0]
    assert keys(sample) <= keys(ours)
    assert ours["eventType"] == sample["eventType"]
    assert ours["data"]["operationName"] == sample["data"]["operationName"]


def test_outside_actor_events_carry_the_actors_object_id(sim: ArmSim) -> None:
    sim.actor.set_capacity("rg-web", "web", 12)
    sim.actor.delete_vm("rg-api", "api", sim.scale_set("rg-api", "api").vms[0].instance_id)
    sim.clock.advance(60)
    by_operation = {e["data"]["operationName"]: e for e in sim.events}
    assert set(by_operation) == {
        "Microsoft.Compute/virtualMachineScaleSets/write",
        "Microsoft.Compute/virtualMachines/delete",
    }
    for event in sim.events:
        assert event["data"]["claims"][OBJECT_ID_CLAIM] == sim.scenario.actor_principal_id
    vm_delete = by_operation["Microsoft.Compute/virtualMachines/delete"]
    assert vm_delete["eventType"] == "Microsoft.Resources.ResourceDeleteSuccess"
    assert "/providers/Microsoft.Compute/virtualMachines/api_" in vm_delete["subject"]


def test_each_client_credential_names_its_own_principal(sim: ArmSim) -> None:
    other = sim.compute_client(
        credential=sim.credential_for("11111111-2222-4333-8444-555555555555")
    )
    other.virtual_machine_scale_set_vms.begin_delete("rg-web", "web", "3")
    sim.clock.advance(30)
    event = sim.events[-1]
    assert event["eventType"] == "Microsoft.Resources.ResourceDeleteSuccess"
    assert event["data"]["operationName"] == (
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/delete"
    )
    assert event["data"]["claims"][OBJECT_ID_CLAIM] == "11111111-2222-4333-8444-555555555555"
    assert event["data"]["authorization"]["evidence"]["principalId"] == (
        "11111111-2222-4333-8444-555555555555"
    )


def test_failed_and_canceled_operations_emit_failure_and_cancel(make_sim: SimFactory) -> None:
    sim = make_sim(web_scenario())
    sim.faults.add(kind="operation_failure", operation="vmss.update", code="InternalError")
    sim.actor.set_capacity("rg-web", "web", 14)
    sim.actor.set_capacity("rg-web", "web", 15)  # preempts the first
    sim.clock.advance(60)
    types = [e["eventType"] for e in sim.events]
    assert types == [
        "Microsoft.Resources.ResourceWriteCancel",
        "Microsoft.Resources.ResourceWriteSuccess",
    ]
    sim.actor.set_capacity("rg-web", "web", 13)
    sim.faults.add(kind="operation_failure", operation="vmss.update", code="InternalError")
    sim.actor.set_capacity("rg-web", "web", 12)
    sim.clock.advance(60)
    assert sim.events[-1]["eventType"] == "Microsoft.Resources.ResourceWriteFailure"
    assert sim.events[-1]["data"]["status"] == "Failed"


def test_functions_converter_decodes_our_events(sim: ArmSim) -> None:
    sim.actor.set_capacity("rg-web", "web", 14)
    sim.clock.advance(60)
    event = EventGridEventInConverter.decode(
        Datum(json.dumps(sim.events[0]), "json"), trigger_metadata=None
    )
    assert event.event_type == "Microsoft.Resources.ResourceWriteSuccess"
    assert event.get_json()["operationName"] == "Microsoft.Compute/virtualMachineScaleSets/write"


def test_http_delivery_posts_event_grid_arrays(make_sim: SimFactory) -> None:
    received: list[Any] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/events"
        sim = make_sim(web_scenario())
        delivery = sim.deliver_events_to(url)
        sim.actor.set_capacity("rg-web", "web", 12)
        sim.clock.advance(60)
        delivery.flush(5)
        delivery.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert len(received) == 1 and isinstance(received[0], list)
    assert received[0][0]["eventType"] == "Microsoft.Resources.ResourceWriteSuccess"


def test_refused_write_emits_failure_at_once(sim: ArmSim, compute) -> None:
    from azure.core.exceptions import HttpResponseError

    sim.faults.add(kind="linked_authorization_failed", operation="vmss.update")
    try:
        compute.virtual_machine_scale_sets.begin_update(
            "rg-web", "web", VirtualMachineScaleSetUpdate(sku=Sku(capacity=14))
        )
    except HttpResponseError as error:
        assert error.status_code == 403
    event = sim.events[-1]
    assert event["eventType"] == "Microsoft.Resources.ResourceWriteFailure"
    assert event["data"]["claims"][OBJECT_ID_CLAIM] == sim.scenario.app_principal_id
    assert event["subject"].endswith("/virtualMachineScaleSets/web")
    refused_reads = len(sim.events)
    sim.faults.add(kind="error", operation="vmss.get")
    with contextlib.suppress(HttpResponseError):
        compute.virtual_machine_scale_sets.get("rg-web", "web")
    assert len(sim.events) == refused_reads


def test_a_sink_may_call_back_into_armsim_over_http(sim: ArmSim, compute) -> None:
    """An event handler that reads the scale set (as the app's trigger does) must not hang."""
    seen: list[int] = []

    def handler(event: dict[str, Any]) -> None:
        seen.append(compute.virtual_machine_scale_sets.get("rg-web", "web").sku.capacity)
        if len(seen) == 1:
            sim.actor.set_capacity("rg-web", "web", 11)

    sim.on_event = handler
    sim.actor.set_capacity("rg-web", "web", 12)
    sim.clock.advance(31)
    sim.clock.advance(31)
    assert seen == [12, 11]
    assert len(sim.events) == 2


def test_sinks_can_be_added_and_removed(sim: ArmSim) -> None:
    first: list[str] = []
    second: list[str] = []
    sim.add_event_sink(lambda e: first.append(e["id"]))
    sink = second.append
    sim.add_event_sink(sink)
    sim.actor.set_capacity("rg-web", "web", 12)
    sim.clock.advance(60)
    sim.remove_event_sink(sink)
    sim.remove_event_sink(print)  # unknown: ignored
    sim.actor.set_capacity("rg-web", "web", 11)
    sim.clock.advance(60)
    assert len(first) == 2 and len(second) == 1


def test_a_failing_sink_neither_breaks_requests_nor_other_sinks(sim: ArmSim, compute) -> None:
    import pytest

    delivered: list[str] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")

    sim.add_event_sink(broken)
    sim.add_event_sink(lambda e: delivered.append(e["id"]))
    compute.virtual_machine_scale_set_vms.begin_delete("rg-web", "web", "3")
    sim.faults.add(kind="conflict", operation="vmss.update")
    with pytest.raises(Exception, match="another operation"):
        compute.virtual_machine_scale_sets.begin_update(
            "rg-web", "web", VirtualMachineScaleSetUpdate(sku=Sku(capacity=14))
        )
    assert len(delivered) == 1  # the refusal's Failure event reached the healthy sink
    with pytest.raises(RuntimeError, match="handler bug"):
        sim.clock.advance(30)  # the delete ends: in-process callers see the sink's error
    assert len(delivered) == 2
    assert len(sim.sink_errors) == 2
