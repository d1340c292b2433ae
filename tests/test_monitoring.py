"""The workbook's and alerts' queries read only what the app really logs.

The demo runs in this process (the real functions, armsim, Azurite) and every record the app
emits is kept. Each query under infra/modules/monitoring/ names message prefixes, regexes,
`parse message with` shapes, metrics and `dims.<field>` dimensions; each must be found in
those records. The same check must fail on records where a field, a metric or a message shape
was renamed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from devkit.demo import run_demo
from rebalancer.operation import State
from rebalancer.telemetry import Metric

QUERIES = Path(__file__).resolve().parents[1] / "infra" / "modules" / "monitoring"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "observability.md"
_METRIC = re.compile(r"^metric (\S+)=(\S+) (\{.*\})$")

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Query:
    name: str
    metrics: frozenset[str]
    fields: frozenset[str]
    prefixes: frozenset[str]
    regexes: frozenset[str]
    shapes: tuple[str, ...]
    """`parse message with` patterns, as regexes."""


def read_query(path: Path) -> Query:
    text = path.read_text(encoding="utf-8")
    shapes = tuple(
        _parse_pattern(pattern) for pattern in re.findall(r"parse message with (.+)$", text, re.M)
    )
    return Query(
        name=path.name,
        metrics=frozenset(re.findall(r"metric (rebalancer\.[\w.]+)=", text)),
        fields=frozenset(re.findall(r"\bdims\.(\w+)", text)),
        prefixes=frozenset(re.findall(r'startswith "([^"]+)"', text)),
        regexes=frozenset(re.findall(r'matches regex @"([^"]+)"', text)),
        shapes=shapes,
    )


def _parse_pattern(pattern: str) -> str:
    """`"operation " operationId " on " *` -> `operation (.*?) on (.*?)`, anchored."""
    parts = re.findall(r'"([^"]*)"|(\S+)', pattern.strip())
    regex = "".join(re.escape(literal) if name == "" else "(.*?)" for literal, name in parts)
    return f"^{regex}$"


def queries() -> list[Query]:
    return [read_query(path) for path in sorted(QUERIES.glob("*.kql"))]


def metric_lines(messages: list[str]) -> dict[str, list[Mapping[str, object]]]:
    """Dimensions of every metric line, by metric name."""
    found: dict[str, list[Mapping[str, object]]] = {}
    for message in messages:
        match = _METRIC.match(message)
        if match:
            found.setdefault(match.group(1), []).append(json.loads(match.group(3)))
    return found


def contract_problems(query: Query, messages: list[str]) -> list[str]:
    """What the query reads that no captured record carries."""
    metrics = metric_lines(messages)
    problems = [
        f"{query.name}: no record is metric {name}" for name in query.metrics if name not in metrics
    ]
    for field in sorted(query.fields):
        carriers = [name for name in query.metrics if metrics.get(name)]
        if not any(all(field in dims for dims in metrics[name]) for name in carriers):
            problems.append(f"{query.name}: dimension {field} is missing from {sorted(carriers)}")
    for prefix in sorted(query.prefixes):
        if not any(m.startswith(prefix) for m in messages):
            problems.append(f"{query.name}: no message starts with {prefix!r}")
    for pattern in sorted(query.regexes):
        if not any(re.search(pattern, m) for m in messages):
            problems.append(f"{query.name}: no message matches {pattern!r}")
    for shape in query.shapes:
        if not any(re.match(shape, m, re.S) for m in messages):
            problems.append(f"{query.name}: no message has the shape {shape!r}")
    return problems


@pytest.fixture(scope="module")
def messages() -> Iterator[list[str]]:
    """Every record the app emits while the demo runs, as the host would ship it: the text."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.INFO)
    app = logging.getLogger("rebalancer")
    app.addHandler(handler)
    try:
        summary, _ = run_demo(lambda frame: None)
    finally:
        app.removeHandler(handler)
    assert summary.converged
    yield [record.getMessage() for record in records]


def test_there_are_queries_for_every_tile_and_alert():
    names = {query.name for query in queries()}
    assert {
        "zones.kql",
        "imbalanced.kql",
        "operations.kql",
        "backoffs.kql",
        "throttling.kql",
        "last-audit.kql",
        "alert-operation-failed.kql",
        "alert-imbalance-stuck.kql",
        "alert-timer-stopped.kql",
    } <= names


@pytest.mark.parametrize("query", queries(), ids=lambda query: query.name)
def test_each_query_reads_what_the_demo_emits(query, messages):
    assert query.metrics or query.prefixes or query.regexes, f"{query.name} reads nothing"
    assert contract_problems(query, messages) == []


def test_queries_name_documented_metrics_and_states():
    documented = DOCS.read_text(encoding="utf-8")
    known = {str(metric) for metric in Metric}
    for query in queries():
        for name in query.metrics:
            assert name in known, (query.name, name)
            assert f"`{name}`" in documented, (query.name, name)
        for states in re.findall(r"-> \(([\w|]+)\)", "".join(query.regexes)):
            assert set(states.split("|")) <= {str(state) for state in State}, query.name


def renamed(messages: list[str], old: str, new: str) -> list[str]:
    return [message.replace(old, new) for message in messages]


def problems_of(name: str, messages: list[str]) -> list[str]:
    (query,) = [query for query in queries() if query.name == name]
    return contract_problems(query, messages)


def test_the_check_fails_when_a_dimension_is_renamed(messages):
    broken = renamed(messages, '"active":', '"activeVms":')
    assert any("dimension active" in p for p in problems_of("zones.kql", broken))
    broken = renamed(messages, '"optIn":', '"opt_in":')
    assert any("dimension optIn" in p for p in problems_of("alert-imbalance-stuck.kql", broken))


def test_the_check_fails_when_a_metric_is_renamed(messages):
    broken = renamed(messages, "metric rebalancer.zone_backoffs=", "metric rebalancer.backoffs=")
    assert any("no record is metric" in p for p in problems_of("backoffs.kql", broken))


def test_the_check_fails_when_a_message_shape_changes(messages):
    broken = [re.sub(r": (\w+) -> (\w+) \(", r": \1 => \2 (", m) for m in messages]
    assert problems_of("alert-operation-failed.kql", broken)
    assert problems_of("operations.kql", broken)
    broken = renamed(messages, "timer tick", "tick")
    assert problems_of("alert-timer-stopped.kql", broken)
