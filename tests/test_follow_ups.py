"""Follow-ups of in-flight operations: a Storage queue message with a visibility delay is the
durable timer that brings an operation back when its next change is due (new VMs healthy),
through the real `on_follow_up` function fed as the host feeds it (QueueMessageInConverter).

The queue adapter runs against Azurite's Queue service; the end-to-end tests keep the
messages on armsim's virtual clock (a real visibility delay would take real seconds).
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from armsim import ScaleSetSpec, Scenario
from devkit.azurite import AzuriteQueue
from devkit.host import Host, indexed_functions
from devkit.stack import running_stack
from rebalancer import service
from rebalancer.azure_operations import FOLLOW_UP_FUNCTION_NAME
from rebalancer.follow_up_queue import FollowUpQueue
from rebalancer.followup import FollowUp
from rebalancer.model import ScaleSetRef
from rebalancer.operation import State
from rebalancer.transport import Urllib3Transport

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def azurite_queue() -> Iterator[AzuriteQueue]:
    with AzuriteQueue() as server:
        yield server


class Recorder:
    """The follow-up sender of a virtual-time test: keeps what was sent, in due order."""

    def __init__(self) -> None:
        self.sent: list[FollowUp] = []

    def schedule(self, follow_up: FollowUp, now: datetime) -> None:
        self.sent.append(follow_up)

    def take_due(self, now: datetime) -> list[FollowUp]:
        due = [f for f in self.sent if f.due <= now]
        self.sent = [f for f in self.sent if f.due > now]
        return due


# -- the message and the schedule (pure) ------------------------------------------------


def test_a_follow_up_survives_its_json_and_names_what_is_wrong():
    message = FollowUp("sub/rg/web", "op1", 3, T0)
    assert FollowUp.from_json(message.to_json()) == message
    assert message.next(T0 + timedelta(seconds=10)).seq == 4
    with pytest.raises(ValueError, match="lacks due"):
        FollowUp.from_json('{"scaleSet": "s", "operation": "o", "seq": 1}')
    with pytest.raises(ValueError, match="not JSON"):
        FollowUp.from_json("hello")
    with pytest.raises(ValueError, match="no time zone"):
        FollowUp.from_json('{"scaleSet": "s", "operation": "o", "seq": 1, "due": "2026-01-01"}')


# -- the queue (Azurite) ------------------------------------------------------------------


def _sent_through_the_apps_transport(monkeypatch) -> list[tuple[str, str]]:
    sent: list[tuple[str, str]] = []
    original = Urllib3Transport.send

    def counted(self: Urllib3Transport, request: Any, **kwargs: Any) -> Any:
        sent.append((request.method, request.url))
        return original(self, request, **kwargs)

    monkeypatch.setattr(Urllib3Transport, "send", counted)
    return sent


def test_a_follow_up_stays_invisible_until_it_is_due_and_reads_as_the_host_reads_it(
    azurite_queue, monkeypatch
):
    from azure.storage.queue import QueueClient

    name = f"f{uuid.uuid4().hex[:12]}"
    queue = FollowUpQueue(name, connection_string=azurite_queue.connection_string)
    reader = QueueClient.from_connection_string(azurite_queue.connection_string, name)
    sent = _sent_through_the_apps_transport(monkeypatch)
    try:
        now = datetime.now(UTC)
        later = FollowUp("sub/rg/web", "op1", 1, now + timedelta(seconds=2))
        queue.schedule(later, now)  # creates the missing queue on the way
        # send (404: no queue), create, send again: all on the app's HTTP stack
        assert [method for method, _ in sent] == ["POST", "PUT", "POST"]
        assert list(reader.receive_messages()) == []
        time.sleep(2.5)
        (received,) = list(reader.receive_messages())
        # The host's queue trigger reads Base64 text by default.
        body = base64.b64decode(received.content).decode()
        assert FollowUp.from_json(body) == later
    finally:
        reader.delete_queue()
        reader.close()
        queue.close()


# -- the function, end to end ---------------------------------------------------------------


def test_the_queue_trigger_is_bound_to_the_follow_up_queue_setting():
    (binding,) = indexed_functions()[FOLLOW_UP_FUNCTION_NAME].get_bindings()
    assert binding.type == "queueTrigger"
    assert binding.get_dict_repr()["queueName"] == "%REBALANCER_FOLLOW_UP_QUEUE%"
    assert binding.get_dict_repr()["connection"] == "AzureWebJobsStorage"


def _one_move() -> Scenario:
    spec = ScaleSetSpec(
        "web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags={"zone-rebalance": "enabled"}
    )
    return Scenario(scale_sets=(spec,))


def test_a_move_completes_on_follow_ups_and_events_without_a_timer_tick(store_factory):
    """Create 60 s + health 30 s + delete 30 s: done at 120 s, with no timer tick after the
    one that started it. While the new VM is not healthy yet, a follow-up reads its instance
    view only, never the scale set's VM list, and the whole move lists the set three times."""
    store = store_factory()
    with running_stack(_one_move(), store) as stack:
        sim = stack.sim
        sent = Recorder()
        runtime = stack.runtime(follow_ups=sent)
        reconciler, host = runtime.reconciler, Host(runtime)
        events: list[dict] = []
        sim.add_event_sink(events.append)
        try:
            reconciler.audit()  # the tick that starts the operation
            assert store.active_operations(), "the audit started no operation"
            assert [f.seq for f in sent.sent] == [0]
            start = sim.clock.now()
            first_request = len(sim.requests)
            lists_while_waiting = 0
            while store.active_operations():
                assert sim.clock.now() - start < timedelta(minutes=5), "not done in 5 min"
                sim.advance(1)
                for payload in events:
                    host.event(payload)
                events.clear()
                for message in sent.take_due(sim.clock.now()):
                    row = store.active_operation(message.scale_set_key)
                    before = len(sim.requests)
                    host.follow_up(message.to_json())
                    waiting = row is not None and row.state == State.AWAITING_HEALTH.value
                    still = store.active_operation(message.scale_set_key)
                    if waiting and still is not None and still.state == row.state:
                        lists_while_waiting += sum(
                            1 for r in sim.requests[before:] if r.operation == "vmss_vm.list"
                        )
            elapsed = (sim.clock.now() - start).total_seconds()
            lists = [r for r in sim.requests[first_request:] if r.operation == "vmss_vm.list"]
        finally:
            sim.remove_event_sink(events.append)
        assert sorted(stack.counts("rg-web", "web").values()) == [2, 2, 3]
        assert elapsed <= 125, elapsed
        assert lists_while_waiting == 0
        # One VM list where the step can change: placed (the write's event), healthy (the
        # follow-up), done (the delete's event); a step decided on at once, and the next
        # assessment, reuse the list just taken.
        assert len(lists) == 3, [r.time.isoformat() for r in lists]


def test_a_follow_up_is_handled_once_and_ends_with_its_operation(store_factory):
    store = store_factory()
    with running_stack(_one_move(), store) as stack:
        sim = stack.sim
        sent = Recorder()
        runtime = stack.runtime(follow_ups=sent)
        reconciler, host = runtime.reconciler, Host(runtime)
        with service.serving(runtime):
            reconciler.audit()
            (first,) = sent.sent
            sent.sent.clear()
            host.follow_up(first.to_json())
            (second,) = sent.sent
            assert second.seq == 1 and second.due > sim.clock.now()
            before = len(sim.requests)
            host.follow_up(first.to_json())  # redelivered: dropped, nothing read, nothing sent
            assert len(sim.requests) == before
            assert sent.sent == [second]
            gone = FollowUp(first.scale_set_key, "another-operation", 0, first.due)
            assert service.handle_follow_up(gone.to_json()) is False
            assert sent.sent == [second]
            service.handle_follow_up("not a follow-up")  # logged and dropped, never raised
        ref = ScaleSetRef.parse(first.scale_set_key)
        assert store.active_operation(ref.key) is not None
