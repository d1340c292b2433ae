"""Metrics and decision logs: what one full operation emits, captured and asserted.

The end-to-end test runs a real move through the stack (armsim through azure-mgmt-compute,
Azurite through azure-data-tables) with the notifier publishing to a loopback Event Grid topic
through the real EventGridPublisherClient.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from armsim import ScaleSetSpec, Scenario
from devkit.stack import running_stack
from rebalancer import operation as op
from rebalancer.evaluator import assess
from rebalancer.model import ScaleSetRef
from rebalancer.telemetry import Measurement, Metric, Telemetry, measure_step, message
from tests.eventgrid_topic import Receiver, Tls, make_tls, notifier_for, running_topic
from tests.fleets import fleet, inventory, scale_set

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
ENABLED = {"zone-rebalance": "enabled"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def receiver(tls: Tls) -> Iterator[Receiver]:
    with running_topic(tls) as topic:
        yield topic


def metrics(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rebalancer.metrics"]


def named(records: list[logging.LogRecord], metric: Metric) -> list[logging.LogRecord]:
    return [r for r in records if r.metricName == str(metric)]  # type: ignore[attr-defined]


def parsed(record: logging.LogRecord) -> tuple[str, float, dict[str, object]]:
    """Read a metric line back the way the KQL in docs/observability.md does."""
    text = record.getMessage()
    head, _, dims = text.partition(" {")
    name, _, value = head.removeprefix("metric ").partition("=")
    return name, float(value), json.loads("{" + dims)


# -- pure ------------------------------------------------------------------------------


def started() -> op.OperationRecord:
    instances = fleet(("1", 1, 0), ("2", 3, 0), ("3", 3, 0))
    observed = inventory(instances, replace(scale_set(), capacity=len(instances)))
    record, _ = op.start(observed, assess(observed), op.OperationPolicy(), T0, "op-7")
    return record


def test_a_started_operation_counts_its_moves() -> None:
    (measurement,) = measure_step(None, started())
    assert measurement.metric is Metric.MOVES_STARTED
    assert measurement.value == 1
    assert measurement.dimensions["operationId"] == "op-7"
    assert measurement.dimensions["targetZones"] == "1"
    assert measurement.dimensions["resourceGroup"] == "rg-web"


def test_a_finished_operation_reports_outcome_and_durations() -> None:
    record = started()
    end = T0 + timedelta(minutes=9)
    done = replace(
        record,
        state=op.State.SUCCEEDED,
        kept=("7",),
        sources=("3",),
        outcome=op.Reason.MOVES_DONE,
        updated_at=end,
    )
    by_metric = {m.metric: m for m in measure_step(record, done)}
    assert by_metric[Metric.MOVES_SUCCEEDED].value == 1
    assert by_metric[Metric.MOVES_SUCCEEDED].dimensions["reason"] == "moves_done"
    assert by_metric[Metric.OPERATION_DURATION].value == 540
    assert by_metric[Metric.OPERATION_DURATION].dimensions["outcome"] == "succeeded"
    assert by_metric[Metric.TIME_TO_BALANCE].value == 540
    rolled_back = replace(done, state=op.State.ROLLED_BACK, kept=())
    assert {m.metric for m in measure_step(record, rolled_back)} == {
        Metric.MOVES_ROLLED_BACK,
        Metric.OPERATION_DURATION,
    }
    assert measure_step(done, done) == []


def test_the_log_line_carries_name_value_and_dimensions() -> None:
    line = message(Measurement(Metric.THROTTLING_WAITS, 17.25, {"call": "SetCapacity"}))
    assert line == 'metric rebalancer.throttling.waits=17.25 {"call":"SetCapacity"}'
    assert message(Measurement(Metric.MOVES_STARTED, 2.0)) == "metric rebalancer.moves.started=2 {}"


def test_emitting_never_raises_and_uses_opentelemetry_only_when_loaded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    recorded: list[tuple[str, str, float, dict[str, object]]] = []

    class Instrument:
        def __init__(self, kind: str, name: str) -> None:
            self.kind, self.name = kind, name

        def add(self, value: float, attributes: dict[str, object]) -> None:
            recorded.append((self.kind, self.name, value, attributes))

        record = set = add

    class Meter:
        def create_counter(self, name: str, unit: str) -> Instrument:
            return Instrument("counter", name)

        def create_histogram(self, name: str, unit: str) -> Instrument:
            return Instrument("histogram", name)

        def create_gauge(self, name: str, unit: str) -> Instrument:
            return Instrument("gauge", name)

    class Api:
        @staticmethod
        def get_meter(name: str) -> Meter:
            assert name == "rebalancer"
            return Meter()

    telemetry = Telemetry()
    monkeypatch.delitem(sys.modules, "opentelemetry.metrics", raising=False)
    with caplog.at_level(logging.INFO, logger="rebalancer.metrics"):
        telemetry.emit([Measurement(Metric.ZONE_BACKOFFS, 1, {"zone": "2"})])
        assert recorded == []  # OpenTelemetry not loaded: logs only
        monkeypatch.setitem(sys.modules, "opentelemetry.metrics", Api)
        telemetry.emit(
            [
                Measurement(Metric.ZONE_BACKOFFS, 1, {"zone": "2", "scaleSetId": "/x"}),
                Measurement(Metric.TIME_TO_BALANCE, 60.0),
                Measurement(Metric.SCALE_SETS_IMBALANCED, 3),
            ]
        )
        monkeypatch.setitem(sys.modules, "opentelemetry.metrics", object())  # broken API
        telemetry.emit([Measurement(Metric.MOVES_STARTED, 1)])  # must not raise
    assert recorded == [
        ("counter", "rebalancer.zone_backoffs", 1, {"zone": "2"}),
        ("histogram", "rebalancer.time_to_balance", 60.0, {}),
        ("gauge", "rebalancer.scale_sets.imbalanced", 3, {}),
    ]
    assert len(metrics(caplog)) == 5


def test_importing_the_function_app_loads_no_telemetry_or_management_sdk() -> None:
    code = (
        "import sys, function_app; "
        "print(sorted(m for m in sys.modules if m.startswith(("
        "'opentelemetry', 'azure.monitor', 'azure.eventgrid', 'azure.mgmt', "
        "'azure.data', 'azure.identity', 'rebalancer.telemetry', 'rebalancer.notify'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- one full operation, end to end ----------------------------------------------------------


def test_one_full_operation_logs_each_decision_once_and_emits_its_metrics(
    store, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    scenario = Scenario(
        scale_sets=(ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),)
    )
    notifier = notifier_for(receiver.endpoint, receiver.ca_path)
    with running_stack(scenario, store) as stack, caplog.at_level(logging.INFO, "rebalancer"):
        ref = ScaleSetRef.parse(stack.sim.scale_set("rg-web", "web").id)
        reconciler = stack.reconciler(on_notify=notifier, telemetry=Telemetry(notifier=notifier))
        reconciler.audit()  # detects the imbalance and starts the move
        for _ in range(120):
            if store.active_operation(ref.key) is None:
                break
            stack.sim.advance(30)
            reconciler.reconcile(ref)
        assert store.active_operation(ref.key) is None
        stack.sim.advance(3600)
        reconciler.audit()  # balanced now
        reconciler.audit()  # unchanged: no new decision lines
    notifier.close()

    (finished,) = store.history(ref.key)
    record = op.OperationRecord.from_json(finished.body)
    assert record.state is op.State.SUCCEEDED

    # One decision line per state the operation entered, each with its dimensions.
    steps = [
        r
        for r in caplog.records
        if r.name == "rebalancer" and "state" in getattr(r, "custom_dimensions", {})
    ]
    entered = [t.state.value for t in record.history]
    changes = [s for i, s in enumerate(entered) if i == 0 or entered[i - 1] != s]
    assert changes == ["scaling_out", "awaiting_health", "scaling_in", "succeeded"]
    assert [r.custom_dimensions["state"] for r in steps] == changes  # type: ignore[attr-defined]
    assessments = [
        r
        for r in caplog.records
        if r.name == "rebalancer" and "balanced" in getattr(r, "custom_dimensions", {})
    ]
    assert [r.custom_dimensions["balanced"] for r in assessments] == [False, True]  # type: ignore[attr-defined]

    # Metrics: started, succeeded, durations, imbalance, audit gauges.
    emitted = metrics(caplog)
    (started_line,) = named(emitted, Metric.MOVES_STARTED)
    name, value, dims = parsed(started_line)
    assert (name, value) == ("rebalancer.moves.started", 1)
    assert dims["scaleSetId"] == ref.id and dims["operationId"] == record.operation_id
    assert started_line.scaleSetId == ref.id  # type: ignore[attr-defined]
    (succeeded,) = named(emitted, Metric.MOVES_SUCCEEDED)
    assert parsed(succeeded)[1] == 1
    (duration,) = named(emitted, Metric.OPERATION_DURATION)
    expected = (record.updated_at - record.created_at).total_seconds()
    assert parsed(duration)[1] == pytest.approx(expected, abs=0.01)
    assert expected > 0
    (balance,) = named(emitted, Metric.TIME_TO_BALANCE)
    assert parsed(balance)[1] == parsed(duration)[1]
    (detected,) = named(emitted, Metric.IMBALANCE_DETECTED)
    assert parsed(detected)[2]["zones"] == "1:1,2:3,3:3"
    imbalanced = [parsed(r)[1] for r in named(emitted, Metric.SCALE_SETS_IMBALANCED)]
    assert imbalanced == [1, 0, 0]
    zones = [parsed(r)[2] for r in named(emitted, Metric.ZONE_VMS)]
    assert [(z["zone"], z["total"], z["active"], z["balanced"]) for z in zones] == [
        ("1", 1, 1, False),
        ("2", 3, 3, False),
        ("3", 3, 3, False),
        ("1", 2, 2, True),
        ("2", 2, 2, True),
        ("3", 3, 3, True),
    ]
    assert all(z["optIn"] == "enabled" and z["scaleSetId"] == ref.id for z in zones)
    (age,) = named(emitted, Metric.IMBALANCE_AGE)  # the first audit only: then balanced
    assert parsed(age)[1] == 0 and parsed(age)[2]["decision"] == "move"
    assert not named(emitted, Metric.MOVES_ROLLED_BACK)
    assert not named(emitted, Metric.ZONE_BACKOFFS)

    # Notifications through the real Event Grid client, in order.
    types = [r.body[0]["type"] for r in receiver.received]  # type: ignore[index]
    assert types == [
        "Rebalancer.ScaleSetImbalanced",
        "Rebalancer.OperationStarted",
        "Rebalancer.OperationSucceeded",
    ]
    succeeded_event = receiver.received[-1].body[0]  # type: ignore[index]
    assert succeeded_event["source"] == ref.id
    assert succeeded_event["data"]["deleted"] == list(record.sources)
    assert succeeded_event["data"]["armCalls"] == list(record.arm_calls)
    assert all(r.headers["authorization"].startswith("Bearer ") for r in receiver.received)


def test_measurements_reach_a_real_opentelemetry_meter_provider() -> None:
    """With the OpenTelemetry API loaded (as the distro does), instruments record for real."""
    from opentelemetry import metrics as otel
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    otel.set_meter_provider(MeterProvider(metric_readers=[reader]))
    telemetry = Telemetry()
    record = started()
    done = replace(
        record,
        state=op.State.SUCCEEDED,
        kept=("7",),
        outcome=op.Reason.MOVES_DONE,
        updated_at=T0 + timedelta(minutes=5),
    )
    telemetry.operation_changed(None, record)
    telemetry.operation_changed(record, done)
    telemetry.emit([Measurement(Metric.SCALE_SETS_IMBALANCED, 2)])
    telemetry.emit([Measurement(Metric.SCALE_SETS_IMBALANCED, 1)])
    points = {
        m.name: m.data.data_points
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    (started_point,) = points["rebalancer.moves.started"]
    assert started_point.value == 1
    assert dict(started_point.attributes) == {
        "resourceGroup": "rg-web",
        "scaleSet": "web",
        "location": "westeurope",
        "sku": "Standard_D2s_v5",
    }
    (duration,) = points["rebalancer.operation.duration"]
    assert (duration.count, duration.sum) == (1, 300)
    assert duration.attributes["outcome"] == "succeeded"
    (balance,) = points["rebalancer.time_to_balance"]
    assert balance.sum == 300
    (gauge,) = points["rebalancer.scale_sets.imbalanced"]
    assert gauge.value == 1  # the last audit's number


def test_decision_lines_get_flat_dimensions_for_application_insights(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from rebalancer.telemetry import flatten_dimensions

    logger = logging.getLogger("rebalancer.test-flat")
    flatten_dimensions(logger)
    flatten_dimensions(logger)  # idempotent
    assert len(logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="rebalancer.test-flat"):
        logger.info(
            "decided",
            extra={
                "custom_dimensions": {
                    "scaleSetId": "/x",
                    "zones": {"1": 2},
                    "balanced": False,
                    "name": "must not replace the logger name",
                }
            },
        )
    (record,) = [r for r in caplog.records if r.name == "rebalancer.test-flat"]
    assert record.scaleSetId == "/x"  # type: ignore[attr-defined]
    assert record.zones == '{"1": 2}'  # type: ignore[attr-defined]
    assert record.balanced is False  # type: ignore[attr-defined]
    assert record.name == "rebalancer.test-flat"
