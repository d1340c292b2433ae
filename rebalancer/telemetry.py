"""Metrics to chart and alert on: one structured log record per measurement.

Why log records and not the Azure Monitor OpenTelemetry distro: importing
`azure.monitor.opentelemetry` took 270-880 ms (median ~450 ms) on the development machine,
several times what importing the whole `function_app` costs (85-200 ms), and every cold start
would pay it. A log record costs nothing to import, reaches Application Insights through the
Functions host as a `traces` row, and is charted or alerted on with KQL (docs/observability.md).

Each measurement is one record on the `rebalancer.metrics` logger:

    message  "metric <name>=<value> <JSON of the dimensions>"   (parse_json in KQL)
    extra    metricName, metricValue, metricUnit and each dimension as a flat attribute

The message carries everything because the host's built-in logging ships only the message
text; the flat attributes become `customDimensions` when the app runs the OpenTelemetry distro
(`PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true`). If that distro (or anything else) has
already loaded the OpenTelemetry metrics API in the process, each measurement is also recorded
on an OpenTelemetry counter or histogram, which the distro exports to `customMetrics`; this
module never imports OpenTelemetry itself.

Deciding what to measure is pure (`measure_*` functions); `Telemetry` only emits.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from rebalancer.model import ScaleSetRef

if TYPE_CHECKING:
    from rebalancer.notify import Notification
    from rebalancer.operation import OperationRecord
    from rebalancer.verdict import Result, Verdict

log = logging.getLogger("rebalancer.metrics")


class Metric(StrEnum):
    SCALE_SETS_ASSESSED = "rebalancer.scale_sets.assessed"
    """Scale sets assessed by one audit pass (gauge, once per audit)."""
    SCALE_SETS_IMBALANCED = "rebalancer.scale_sets.imbalanced"
    """Scale sets out of balance in one audit pass (gauge, once per audit)."""
    IMBALANCE_DETECTED = "rebalancer.imbalance.detected"
    """A scale set's assessment changed to out of balance (count)."""
    MOVES_STARTED = "rebalancer.moves.started"
    MOVES_SUCCEEDED = "rebalancer.moves.succeeded"
    MOVES_ROLLED_BACK = "rebalancer.moves.rolled_back"
    MOVES_SUPERSEDED = "rebalancer.moves.superseded"
    MOVES_FAILED = "rebalancer.moves.failed"
    OPERATION_DURATION = "rebalancer.operation.duration"
    """Seconds from an operation's start to its end, any outcome (histogram)."""
    TIME_TO_BALANCE = "rebalancer.time_to_balance"
    """Seconds from the start to the success of an operation that did every move its scale
    set needed (histogram); a set needing more moves than `maxSurge` reports its last one."""
    ZONE_VMS = "rebalancer.zone.vms"
    """VMs in one zone of a scale set (total; `active` and the verdict as dimensions), one
    per zone whenever the scale set's assessment changed, balanced or not (gauge)."""
    IMBALANCE_AGE = "rebalancer.imbalance.age"
    """Seconds a scale set has been out of balance, for each such set after each audit
    pass (gauge)."""
    ZONE_BACKOFFS = "rebalancer.zone_backoffs"
    THROTTLING_WAITS = "rebalancer.throttling.waits"
    """Azure Compute throttled a call; `value` is the Retry-After in seconds (0 if none)."""


_HISTOGRAMS = frozenset({Metric.OPERATION_DURATION, Metric.TIME_TO_BALANCE})
_GAUGES = frozenset(
    {
        Metric.SCALE_SETS_ASSESSED,
        Metric.SCALE_SETS_IMBALANCED,
        Metric.ZONE_VMS,
        Metric.IMBALANCE_AGE,
    }
)
_UNITS: Mapping[Metric, str] = {
    Metric.IMBALANCE_AGE: "s",
    Metric.OPERATION_DURATION: "s",
    Metric.TIME_TO_BALANCE: "s",
    Metric.THROTTLING_WAITS: "s",
}
_OUTCOMES: Mapping[str, Metric] = {
    "succeeded": Metric.MOVES_SUCCEEDED,
    "rolled_back": Metric.MOVES_ROLLED_BACK,
    "superseded": Metric.MOVES_SUPERSEDED,
    "failed": Metric.MOVES_FAILED,
}


@dataclass(frozen=True, slots=True)
class Measurement:
    metric: Metric
    value: float
    dimensions: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return _UNITS.get(self.metric, "1")


class Publisher(Protocol):
    def publish(self, notification: Notification) -> bool: ...


class BackoffLike(Protocol):
    """`rebalancer.store.ZoneBackoff`."""

    location: str
    sku: str
    zone: str
    failures: int
    until: datetime


# -- what to measure (pure) ----------------------------------------------------------------


def _scale_set(scale_set_id: str) -> dict[str, str]:
    ref = ScaleSetRef.parse(scale_set_id)
    return {"scaleSetId": ref.id, "resourceGroup": ref.resource_group, "scaleSet": ref.name}


def _operation(record: OperationRecord) -> dict[str, str | int | float | bool]:
    return {
        **_scale_set(record.scale_set_id),
        "operationId": record.operation_id,
        "location": record.location,
        "sku": record.sku,
        "targetZones": ",".join(record.target_zones),
    }


def measure_step(before: OperationRecord | None, after: OperationRecord) -> list[Measurement]:
    """Measurements for an operation that entered a new state (`before` None: it began)."""
    if before is not None and before.state is after.state:
        return []
    dims = _operation(after)
    if before is None or (before.state.value == "planned" and not after.state.terminal):
        return [Measurement(Metric.MOVES_STARTED, after.k, dims)]
    if not after.state.terminal or before.state.terminal:
        return []
    outcome = after.state.value
    moved = len(after.kept) if outcome == "succeeded" else after.k
    duration = (after.updated_at - after.created_at).total_seconds()
    measurements = [
        Measurement(_OUTCOMES[outcome], moved, {**dims, "reason": str(after.outcome or "")}),
        Measurement(Metric.OPERATION_DURATION, duration, {**dims, "outcome": outcome}),
    ]
    if outcome == "succeeded" and len(after.kept) >= after.moves_needed:
        measurements.append(Measurement(Metric.TIME_TO_BALANCE, duration, dims))
    return measurements


def measure_verdict(verdict: Verdict) -> list[Measurement]:
    """A changed assessment: counts when it turned out of balance."""
    a = verdict.assessment
    if a.balanced:
        return []
    zones = ",".join(f"{z}:{c.total}" for z, c in sorted(a.zones.items()))
    dims = {
        **_scale_set(a.ref.id),
        "zones": zones,
        "decision": verdict.decision,
        "reason": verdict.reason,
    }
    return [Measurement(Metric.IMBALANCE_DETECTED, 1, dims)]


def _verdict_dims(verdict: Verdict) -> dict[str, str | int | float | bool]:
    return {
        **_scale_set(verdict.assessment.ref.id),
        "balanced": verdict.assessment.balanced,
        "decision": verdict.decision,
        "reason": verdict.reason,
        "optIn": str(verdict.opt_in),
    }


def measure_zones(verdict: Verdict) -> list[Measurement]:
    """A changed assessment: the VMs of each zone, total and active."""
    dims = _verdict_dims(verdict)
    return [
        Measurement(
            Metric.ZONE_VMS, c.total, {**dims, "zone": zone, "total": c.total, "active": c.active}
        )
        for zone, c in sorted(verdict.assessment.zones.items())
    ]


def measure_audit(
    results: Iterable[Result],
    imbalanced_since: Mapping[str, datetime] | None = None,
    now: datetime | None = None,
    *,
    totals: tuple[int, int] | None = None,
    gauges: bool = True,
) -> list[Measurement]:
    """Gauges for one audit pass over the subscription, and how long each scale set out of
    balance (`imbalanced_since` by scale set key) has been so.

    An audit pass may span several invocations: `results` are then one slice's, `totals`
    the whole pass's (assessed, out of balance) once it ended; a slice that did not end it
    reports no gauges (`gauges=False`)."""
    verdicts = [r.verdict for r in results if r.verdict is not None]
    imbalanced = [v for v in verdicts if not v.assessment.balanced]
    assessed, out = totals if totals is not None else (len(verdicts), len(imbalanced))
    measurements = []
    if gauges:
        measurements += [
            Measurement(Metric.SCALE_SETS_ASSESSED, assessed),
            Measurement(Metric.SCALE_SETS_IMBALANCED, out),
        ]
    for verdict in imbalanced:
        since = (imbalanced_since or {}).get(verdict.assessment.ref.key)
        if since is None or now is None:
            continue
        age = max(0.0, (now - since).total_seconds())
        dims = {**_verdict_dims(verdict), "since": since.isoformat()}
        measurements.append(Measurement(Metric.IMBALANCE_AGE, age, dims))
    return measurements


def measure_backoff(record: OperationRecord | None, backoff: BackoffLike) -> list[Measurement]:
    dims: dict[str, str | int | float | bool] = {
        "location": backoff.location,
        "sku": backoff.sku,
        "zone": backoff.zone,
        "failures": backoff.failures,
        "until": backoff.until.isoformat(),
    }
    if record is not None:
        dims |= {**_scale_set(record.scale_set_id), "operationId": record.operation_id}
    return [Measurement(Metric.ZONE_BACKOFFS, 1, dims)]


def measure_throttling(
    scale_set_id: str | None, retry_after: float | None, call: str
) -> list[Measurement]:
    dims: dict[str, str | int | float | bool] = {"call": call}
    if scale_set_id:
        dims |= _scale_set(scale_set_id)
    return [Measurement(Metric.THROTTLING_WAITS, float(retry_after or 0), dims)]


# -- emitting ------------------------------------------------------------------------------


def message(measurement: Measurement) -> str:
    """The log line: `metric <name>=<value> {dimensions}` (KQL: parse_json of the braces)."""
    value = measurement.value
    shown = int(value) if float(value).is_integer() else round(value, 3)
    dims = json.dumps(dict(measurement.dimensions), sort_keys=True, separators=(",", ":"))
    return f"metric {measurement.metric}={shown} {dims}"


@dataclass
class Telemetry:
    """Emits measurements, and the notifications that go with them when a topic is set.

    One per process, thread-safe. `notifier`: where `ScaleSetImbalanced` and
    `ZoneCapacityBackoff` events go (an `EventGridNotifier`); operation lifecycle events go
    through the reconciler's `on_notify` hook instead.
    """

    notifier: Publisher | None = None
    logger: logging.Logger = field(default_factory=lambda: log)
    _instruments: dict[Metric, Any] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    # hooks the reconciler calls ------------------------------------------------------------

    def operation_changed(self, before: OperationRecord | None, after: OperationRecord) -> None:
        self.emit(measure_step(before, after))

    def assessment_changed(self, verdict: Verdict, at: datetime) -> None:
        measurements = measure_verdict(verdict)
        self.emit([*measurements, *measure_zones(verdict)])
        if measurements and self.notifier is not None:
            from rebalancer.notify import for_imbalance

            self.notifier.publish(for_imbalance(verdict, at))

    def audited(
        self,
        results: Iterable[Result],
        imbalanced_since: Mapping[str, datetime] | None = None,
        now: datetime | None = None,
        *,
        totals: tuple[int, int] | None = None,
        gauges: bool = True,
    ) -> None:
        """`totals`: (assessed, out of balance) of a pass that spanned several invocations;
        `gauges=False` for a slice that leaves the pass unfinished (its scale sets'
        imbalance ages only)."""
        self.emit(measure_audit(results, imbalanced_since, now, totals=totals, gauges=gauges))

    def zone_backed_off(
        self, record: OperationRecord | None, backoff: BackoffLike, at: datetime
    ) -> None:
        self.emit(measure_backoff(record, backoff))
        if self.notifier is not None and record is not None:
            from rebalancer.notify import for_backoff

            self.notifier.publish(
                for_backoff(
                    record.scale_set_id,
                    record.operation_id,
                    backoff.location,
                    backoff.sku,
                    backoff.zone,
                    at,
                    failures=backoff.failures,
                    until=backoff.until,
                )
            )

    def throttled(self, scale_set_id: str | None, retry_after: float | None, call: str) -> None:
        self.emit(measure_throttling(scale_set_id, retry_after, call))

    # the sinks -----------------------------------------------------------------------------

    def emit(self, measurements: Iterable[Measurement]) -> None:
        """Log each measurement; record it on OpenTelemetry too when that API is loaded."""
        for measurement in measurements:
            try:
                self.logger.info(
                    "%s",
                    message(measurement),
                    extra={
                        "metricName": str(measurement.metric),
                        "metricValue": measurement.value,
                        "metricUnit": measurement.unit,
                        **measurement.dimensions,
                    },
                )
                self._record_otel(measurement)
            except Exception:  # telemetry never breaks the work it measures
                self.logger.debug("could not emit %s", measurement.metric, exc_info=True)

    def _record_otel(self, measurement: Measurement) -> None:
        api = sys.modules.get("opentelemetry.metrics")
        if api is None:
            return
        instrument = self._instrument(api, measurement.metric)
        attributes = {
            k: v
            for k, v in measurement.dimensions.items()
            if k in ("resourceGroup", "scaleSet", "location", "sku", "zone", "outcome", "call")
        }
        if measurement.metric in _HISTOGRAMS:
            instrument.record(measurement.value, attributes)
        elif measurement.metric in _GAUGES:
            instrument.set(measurement.value, attributes)
        else:
            instrument.add(measurement.value, attributes)

    def _instrument(self, api: Any, metric: Metric) -> Any:
        with self._lock:
            instrument = self._instruments.get(metric)
            if instrument is None:
                meter = api.get_meter("rebalancer")
                unit = _UNITS.get(metric, "1")
                if metric in _HISTOGRAMS:
                    instrument = meter.create_histogram(str(metric), unit=unit)
                elif metric in _GAUGES:
                    instrument = meter.create_gauge(str(metric), unit=unit)
                else:
                    instrument = meter.create_counter(str(metric), unit=unit)
                self._instruments[metric] = instrument
            return instrument


# -- decision logs ---------------------------------------------------------------------------


class FlatDimensions(logging.Filter):
    """Copy a record's `custom_dimensions` dict onto the record as flat attributes.

    The reconciler's decision lines carry `extra={"custom_dimensions": {...}}`. The
    OpenTelemetry distro turns each record attribute into one `customDimensions` key, but a
    dict would arrive as one opaque string; flat attributes arrive as columns (`scaleSetId`,
    `operation`, `state`, `reason`, ...). Values that are not str/int/float/bool become JSON.
    An attribute the record already has is left alone.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        dims = getattr(record, "custom_dimensions", None)
        if isinstance(dims, Mapping):
            for key, value in dims.items():
                if not isinstance(key, str) or hasattr(record, key):
                    continue
                if not isinstance(value, str | int | float | bool):
                    value = json.dumps(value, sort_keys=True, default=str)
                setattr(record, key, value)
        return True


def flatten_dimensions(logger: logging.Logger | None = None) -> None:
    """Install `FlatDimensions` on the `rebalancer` logger (once; idempotent)."""
    target = logger or logging.getLogger("rebalancer")
    if not any(isinstance(f, FlatDimensions) for f in target.filters):
        target.addFilter(FlatDimensions())
