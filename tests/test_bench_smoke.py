"""`python -m bench` at a tiny size: every benchmark runs and prints lines that parse.

No timing is asserted: the benchmark prints figures, a reviewer judges them. What is checked is
the output contract (`bench: <name> <value> <unit> (baseline <v>, ratio <r>, goal <g>)`) and
the arithmetic the figures rest on.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.common import Figure, budget_floor, budget_share_used, parse_line
from bench.time_to_balance import minimum_moves

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {
    "audit.requests_per_scale_set",
    "audit.wall_time",
    "audit.wall_time_vs_naive",
    "audit.throttled_responses",
    "audit.budget_share",
    "audit.cpu_per_page",
    "time_to_balance.1-3-3",
    "time_to_balance.reads_per_move.1-3-3",
    "time_to_balance.budget_share.1-3-3",
    "moves.1-3-3",
    "moves.surge_vm_minutes.1-3-3",
    "cold_start.import_function_app",
    "cold_start.first_invocation",
    "steady_state.table_writes",
    "steady_state.table_reads",
    "steady_state.arm_requests",
    "steady_state.cpu_time",
    "memory.audit_peak_rss",
    "throttling.wave_write_waits",
    "throttling.audit_real_headers",
    "audit_slices.total_time",
    "audit_slices.peak_rss",
    "audit_slices.assessed_once",
}


@pytest.fixture(scope="module")
def quick_run() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-table"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_every_benchmark_prints_one_parseable_line_per_figure(quick_run):
    assert quick_run.returncode == 0, quick_run.stderr[-3000:]
    lines = [line for line in quick_run.stdout.splitlines() if line.strip()]
    parsed = [parse_line(line) for line in lines]
    names = [fields["name"] for fields in parsed]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED
    for fields in parsed:
        float(fields["value"])
        float(fields["baseline"])
        assert fields["unit"]
        assert fields["goal"].strip()


def test_the_quick_figures_say_what_the_product_does(quick_run):
    figures = {f["name"]: f for f in map(parse_line, quick_run.stdout.splitlines())}
    assert figures["moves.1-3-3"]["value"] == "1"  # exactly the minimum
    assert figures["audit.throttled_responses"]["value"] == "0"
    assert float(figures["audit.requests_per_scale_set"]["value"]) <= 2.2
    assert float(figures["audit.requests_per_scale_set"]["baseline"]) > 2.2  # naive: per VM
    # Today's headers hold none of the app's writes; the previous rule held each about 48 s.
    assert figures["throttling.wave_write_waits"]["value"] == "0"
    assert float(figures["throttling.wave_write_waits"]["baseline"]) > 0
    assert figures["throttling.audit_real_headers"]["goal"].startswith("<=1.3x_floor")


def test_a_figure_line_round_trips():
    figure = Figure("audit.wall_time", 322.6, "s", 320.0, "<=1.3x_floor", True)
    line = figure.line()
    assert line == "bench: audit.wall_time 323 s (baseline 320, ratio 1.01, goal <=1.3x_floor)"
    assert parse_line(line) == {
        "name": "audit.wall_time",
        "value": "323",
        "unit": "s",
        "baseline": "320",
        "ratio": "1.01",
        "goal": "<=1.3x_floor",
    }


def test_a_zero_baseline_gives_a_zero_or_infinite_ratio():
    assert Figure("x", 0, "u", 0, "0", True).ratio == 0.0
    assert "ratio inf" in Figure("x", 1, "u", 0, "0", False).line()


@pytest.mark.parametrize("text", ["bench: x 1 s", "audit 1 s (baseline 1, ratio 1, goal 1)", ""])
def test_other_lines_do_not_parse(text):
    with pytest.raises(ValueError, match="not a bench line"):
        parse_line(text)


@pytest.mark.parametrize(
    ("counts", "moves"),
    [
        ({"1": 1, "2": 3, "3": 3}, 1),
        ({"1": 0, "2": 10, "3": 10}, 6),
        ({"1": 2, "2": 4, "3": 7}, 2),
        ({"1": 10, "2": 30, "3": 50}, 20),
        ({"1": 5, "2": 5, "3": 5}, 0),
        ({"1": 0, "2": 4, "3": 4}, 2),
        ({"1": 0, "2": 9}, 4),
    ],
)
def test_minimum_moves(counts, moves):
    assert minimum_moves(counts) == moves


@dataclass
class _Record:
    path: str
    policies: tuple[str, ...]


def test_budget_floor_is_set_by_the_tightest_policy():
    vm_list = "Microsoft.Compute/HighCostListVM3Min"
    log = [_Record("/subscriptions/s/resourceGroups/g/providers/x", ("reads", vm_list))] * 500
    seconds, policy = budget_floor(log, 0.2)
    # 500 calls, 20% of 900 burst = 180 at once, the rest at 20% of 300/min = 1/s
    assert seconds == pytest.approx(320.0)
    assert policy == "HighCostListVM3Min"
    share, which = budget_share_used(log, 320.0)
    assert share == pytest.approx(500 / (900 + 300 * 320 / 60))
    assert which == "HighCostListVM3Min"
