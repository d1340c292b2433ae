"""Notifications through the real EventGridPublisherClient to a loopback HTTPS topic
(tests/eventgrid_topic.py), and the events' shapes."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from rebalancer import notify
from rebalancer import operation as op
from rebalancer.evaluator import assess
from rebalancer.model import Inventory
from rebalancer.notify import EventGridNotifier, EventType
from rebalancer.settings import OptIn
from rebalancer.verdict import Verdict
from tests.eventgrid_topic import TOKEN, Receiver, Tls, make_tls, notifier_for, running_topic
from tests.fleets import fleet, inventory, scale_set

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def receiver(tls: Tls) -> Iterator[Receiver]:
    with running_topic(tls) as topic:
        yield topic


def imbalanced() -> Inventory:
    """2/4/7 VMs in zones 1/2/3: two moves from zone 3 to zone 1."""
    instances = fleet(("1", 2, 0), ("2", 4, 0), ("3", 7, 0))
    return inventory(instances, replace(scale_set(), capacity=len(instances)))


def started_record() -> tuple[op.OperationRecord, tuple[op.Command, ...]]:
    observed = imbalanced()
    return op.start(observed, assess(observed), op.OperationPolicy(), T0, "op-1")


def notify_of(commands: tuple[op.Command, ...]) -> op.Notify:
    return next(c for c in commands if isinstance(c, op.Notify))


# -- building events --------------------------------------------------------------------


def test_operation_started_event_names_the_moves_and_the_scale_set() -> None:
    record, commands = started_record()
    event = notify.for_operation(record, notify_of(commands))
    assert event is not None
    assert event.type is EventType.OPERATION_STARTED
    assert event.type == "Rebalancer.OperationStarted"
    assert event.source == record.scale_set_id
    assert event.subject == "operations/op-1"
    assert event.id == "op-1-scaling_out"
    assert event.time == T0
    assert event.data["reason"] == "scale_out_requested"
    assert event.data["capacityBefore"] == 13
    assert event.data["capacityTarget"] == 14
    assert event.data["targetZones"] == ["1"]
    assert event.data["moves"][0]["fromZone"] == "3"
    assert "endedAt" not in event.data


def test_terminal_events_carry_the_outcome_and_duration() -> None:
    record, _ = started_record()
    ended = T0 + timedelta(minutes=12)
    superseded = op.advance(record, None, op.OperationPolicy(), ended)
    event = notify.for_operation(superseded.record, notify_of(superseded.commands))
    assert event is not None
    assert event.type is EventType.OPERATION_SUPERSEDED
    assert event.data["reason"] == "scale_set_deleted"
    assert event.data["durationSeconds"] == 720
    assert event.data["endedAt"] == ended.isoformat()
    assert event.data["deleted"] == []
    assert event.id == "op-1-superseded"


def test_intermediate_steps_are_not_published() -> None:
    record, _ = started_record()
    assert notify.for_operation(record, op.Notify("operation.awaiting_health", "x")) is None
    assert notify.for_operation(record, op.Notify("operation.rolling_back", "x")) is None


def test_imbalance_and_backoff_events() -> None:
    observed = imbalanced()
    verdict = Verdict(assess(observed), OptIn.AUDIT)
    event = notify.for_imbalance(verdict, T0)
    assert event.type == "Rebalancer.ScaleSetImbalanced"
    assert event.data["zones"]["3"] == {"total": 7, "active": 7}
    assert event.data["decision"] == "move"
    assert len(event.data["moves"]) == 2
    assert notify.for_imbalance(verdict, T0).id == event.id  # same fact, same id
    backoff = notify.for_backoff(
        observed.scale_set.ref.id, "op-1", "WestEurope", "Standard_D2s_v5", "1", T0, failures=2
    )
    assert backoff.subject == "locations/westeurope/skus/standard_d2s_v5/zones/1"
    assert backoff.data["failures"] == 2
    assert backoff.id != event.id


# -- publishing through the real client ---------------------------------------------------


def test_publishes_a_cloud_event_with_a_bearer_token(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    record, commands = started_record()
    notifier = notifier_for(receiver.endpoint, receiver.ca_path)
    with caplog.at_level("WARNING"):
        try:
            notifier(record, notify_of(commands))
        finally:
            notifier.close()
    assert "not a known attribute" not in caplog.text  # the SDK's noise about send options
    assert len(receiver.received) == 1
    request = receiver.received[0]
    assert request.path == "/api/events"
    assert request.query["api-version"] == ["2018-01-01"]
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"].startswith("application/cloudevents-batch+json")
    assert isinstance(request.body, list) and len(request.body) == 1
    event = request.body[0]
    assert event["specversion"] == "1.0"
    assert event["type"] == "Rebalancer.OperationStarted"
    assert event["source"] == record.scale_set_id
    assert event["subject"] == "operations/op-1"
    assert event["id"] == "op-1-scaling_out"
    assert event["time"].startswith("2026-05-01T12:00:00")
    assert event["datacontenttype"] == "application/json"
    assert event["data"]["operationId"] == "op-1"
    assert event["data"]["version"] == 1


def test_a_failing_topic_is_retried_a_bounded_number_of_times(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500, 500]
    notifier = notifier_for(receiver.endpoint, receiver.ca_path, attempts=3)
    record, commands = started_record()
    try:
        assert notifier.publish(notify.for_operation(record, notify_of(commands))) is True
    finally:
        notifier.close()
    assert len(receiver.received) == 3
    assert notifier.sleep.__self__ == [0.5, 1.0]  # type: ignore[attr-defined]
    assert len({json.dumps(r.body, sort_keys=True) for r in receiver.received}) == 1

    receiver.received.clear()
    receiver.statuses = [500] * 5
    notifier = notifier_for(receiver.endpoint, receiver.ca_path, attempts=2)
    with caplog.at_level("WARNING", logger="rebalancer.notify"):
        try:
            assert notifier.publish(notify.for_operation(record, notify_of(commands))) is False
        finally:
            notifier.close()
    assert len(receiver.received) == 2
    assert "could not publish Rebalancer.OperationStarted" in caplog.text
    assert "dropped" in caplog.text


def test_after_a_dropped_event_the_next_ones_get_one_attempt_for_a_while(
    receiver: Receiver,
) -> None:
    now = [1000.0]
    notifier = notifier_for(
        receiver.endpoint, receiver.ca_path, attempts=3, quiet_period=60.0, monotonic=lambda: now[0]
    )
    event = notify.for_operation(*_started_and_notify())
    receiver.statuses = [500] * 10
    try:
        assert notifier.publish(event) is False
        assert len(receiver.received) == 3
        now[0] += 30  # still within the quiet period: one attempt
        assert notifier.publish(event) is False
        assert len(receiver.received) == 4
        now[0] += 61  # each drop restarts the period; now it is over: full attempts again
        receiver.statuses = [500]
        assert notifier.publish(event) is True
        assert len(receiver.received) == 6
        receiver.statuses = [500, 500]  # success reset the period
        assert notifier.publish(event) is True
        assert len(receiver.received) == 9
    finally:
        notifier.close()


def _started_and_notify() -> tuple[op.OperationRecord, op.Notify]:
    record, commands = started_record()
    return record, notify_of(commands)


def test_an_unreachable_topic_never_raises(tls: Tls) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"https://127.0.0.1:{port}/api/events"
    notifier = notifier_for(endpoint, tls[1], attempts=2, timeout=2.0)
    record, commands = started_record()
    try:
        notifier(record, notify_of(commands))  # no exception
        assert notifier.publish(notify.for_operation(record, notify_of(commands))) is False
    finally:
        notifier.close()


def test_the_endpoint_must_be_https() -> None:
    with pytest.raises(ValueError, match="must start with https://"):
        EventGridNotifier("http://127.0.0.1:1/api/events")


def test_default_credential_is_not_built_before_the_first_publish(
    receiver: Receiver,
) -> None:
    notifier = EventGridNotifier(receiver.endpoint)
    assert notifier.credential is None
    assert notifier._client is None


def test_the_runtime_publishes_only_when_a_topic_is_configured(monkeypatch) -> None:
    from rebalancer.service import runtime_from_settings

    monkeypatch.setattr(logging.getLogger("azure"), "level", logging.NOTSET)
    from rebalancer.telemetry import FlatDimensions

    env = {
        "REBALANCER_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000",
        "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    }
    plain = runtime_from_settings(env)
    assert logging.getLogger("azure").level == logging.WARNING  # REBALANCER_SDK_LOG_LEVEL
    assert plain.reconciler.on_notify is None
    assert plain.reconciler.telemetry.notifier is None
    endpoint = "https://topic.westeurope-1.eventgrid.azure.net/api/events"
    wired = runtime_from_settings({**env, "REBALANCER_NOTIFY_TOPIC_ENDPOINT": endpoint})
    notifier = wired.reconciler.on_notify
    assert isinstance(notifier, EventGridNotifier)
    assert notifier.endpoint == endpoint
    assert wired.reconciler.telemetry.notifier is notifier
    assert notifier._client is None  # nothing is built or imported before the first event
    assert any(isinstance(f, FlatDimensions) for f in logging.getLogger("rebalancer").filters)
    for runtime in (plain, wired):
        runtime.store.close()
        runtime.reconciler.compute.close()


def test_an_operation_completes_while_the_topic_fails(
    store, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Failure isolation end to end: every publish gets HTTP 500, the move still finishes."""
    from armsim import ScaleSetSpec, Scenario
    from devkit.stack import running_stack
    from rebalancer.model import ScaleSetRef
    from rebalancer.telemetry import Telemetry

    receiver.statuses = [500] * 100
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec(
                "web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags={"zone-rebalance": "enabled"}
            ),
        )
    )
    notifier = notifier_for(receiver.endpoint, receiver.ca_path, attempts=2)
    with running_stack(scenario, store) as stack, caplog.at_level("WARNING", "rebalancer"):
        ref = ScaleSetRef.parse(stack.sim.scale_set("rg-web", "web").id)
        reconciler = stack.reconciler(on_notify=notifier, telemetry=Telemetry(notifier=notifier))
        reconciler.reconcile(ref)
        for _ in range(120):
            if store.active_operation(ref.key) is None:
                break
            stack.sim.advance(30)
            reconciler.reconcile(ref)
        counts = stack.counts("rg-web", "web")
    notifier.close()
    (finished,) = store.history(ref.key)
    assert finished.state == "succeeded"
    assert sorted(counts.values()) == [2, 2, 3]
    dropped = [r for r in caplog.records if "could not publish" in r.getMessage()]
    assert {r.getMessage().split()[3] for r in dropped} == {
        "Rebalancer.ScaleSetImbalanced",
        "Rebalancer.OperationStarted",
        "Rebalancer.OperationSucceeded",
    }
    assert len(receiver.received) == 2 + 1 + 1  # full attempts once, then one per event
