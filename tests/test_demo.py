"""`python -m rebalancer demo` as a user runs it: a subprocess, its JSON summary, and what it
leaves behind (nothing: no process, no listening port, no temporary file), also when it is
interrupted."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from devkit.demo import describe_verdict, is_balanced

ROOT = Path(__file__).resolve().parent.parent
STARTED = re.compile(
    r"Started Azurite on 127\.0\.0\.1:(\d+) and armsim on https://127\.0\.0\.1:(\d+)"
)
FIRST_MOVE = "operation scaling_out"

pytestmark = pytest.mark.integration


def demo(tmp: Path, *args: str) -> subprocess.Popen[str]:
    """The demo in its own temporary directory (TMPDIR), to check that it empties it."""
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("COLUMNS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "rebalancer", "demo", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def lines_of(stream: Any) -> queue.Queue[str | None]:
    """Read a pipe on a thread, so that waiting for a line can time out."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for(lines: queue.Queue[str | None], pattern: str, seen: list[str]) -> re.Match[str]:
    while True:
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            pytest.fail(f"no line matching {pattern!r} within 60 s; got: {''.join(seen)}")
        if line is None:
            pytest.fail(f"the demo ended before printing {pattern!r}: {''.join(seen)}")
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def processes_in(directory: Path) -> list[str]:
    """Processes whose working directory is inside `directory` (Azurite runs in TMPDIR)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = (proc / "cwd").readlink()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd == directory or directory in cwd.parents:
            found.append(f"{proc.name}: {cmdline}")
    return found


def assert_nothing_left(tmp: Path, ports: tuple[int, ...]) -> None:
    assert ports and all(not listening(port) for port in ports), ports
    assert processes_in(tmp) == []
    assert sorted(p.name for p in tmp.iterdir()) == []


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "tmp"
    directory.mkdir()
    yield directory


def test_the_demo_balances_what_it_may_and_leaves_the_rest_alone(tmp):
    process = demo(tmp, "--json")
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert stdout.count("\n") == 1, "stdout holds exactly one JSON document"
    summary = json.loads(stdout)
    sets = {item["id"].rsplit("/", 1)[-1]: item for item in summary["scaleSets"]}
    assert set(sets) == {"web", "api", "batch", "cache", "jobs"}
    for item in sets.values():
        assert set(item) >= {"id", "before", "after", "balanced", "mode", "operations"}
        assert item["balanced"] == is_balanced(item["after"])
        if item is not sets["web"]:
            assert sum(item["after"].values()) == sum(item["before"].values())
    enforced = [item for item in sets.values() if item["mode"] == "enforce"]
    assert {s["id"].rsplit("/", 1)[-1] for s in enforced} == {"web", "api", "cache", "jobs"}
    assert all(item["balanced"] for item in enforced if item is not sets["jobs"])
    # the scale-out into a full zone and the imbalanced Flexible set were fixed by moves
    # web's picture is taken while autoscale's scale-out to 15 runs: with Azure's default
    # overprovisioning it shows 3 extra VMs that Azure deletes once the 6 requested succeeded.
    assert sets["web"]["before"] == {"1": 3, "2": 8, "3": 7}
    assert sum(sets["web"]["after"].values()) == 15
    assert not is_balanced(sets["api"]["before"])
    for name in ("web", "api"):
        operations = sets[name]["operations"]
        assert operations and all(o["state"] in ("succeeded", "rolled_back") for o in operations)
        assert sum(o["moves"] for o in operations) == 2
    # web's first move found zone 1 still full: rolled back, then moved once it had room
    assert [o["state"] for o in sets["web"]["operations"]].count("rolled_back") == 1
    assert all(o["state"] == "succeeded" for o in sets["api"]["operations"])
    # the untagged set is reported, never changed; the balanced one is left alone
    assert sets["batch"]["mode"] == "audit"
    assert sets["batch"]["before"] == sets["batch"]["after"] == {"1": 1, "2": 1, "3": 4}
    assert sets["batch"]["operations"] == []
    assert sets["cache"]["operations"] == []
    # autoscale holds jobs at its maximum: skipped with the reason and the setting to change
    jobs = sets["jobs"]
    assert jobs["before"] == jobs["after"] == {"1": 1, "2": 1, "3": 3}
    assert (jobs["operations"], jobs["balanced"]) == ([], False)
    assert jobs["reason"] == "autoscale_at_maximum"
    assert "jobs-autoscale" in jobs["verdict"] and "Raise the profile's maximum" in jobs["verdict"]
    # the protected VMs are still there
    protected = sets["api"]["protected"]
    assert len(protected["before"]) == 2
    assert protected["after"] == protected["before"]
    ports = tuple(int(port) for port in STARTED.search(stderr).groups())
    assert_nothing_left(tmp, ports)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_demo_stops_what_it_started(tmp, signum):
    process = demo(tmp, "--json", "--pace", "0.3")
    seen: list[str] = []
    try:
        lines = lines_of(process.stderr)
        ports = tuple(int(port) for port in wait_for(lines, STARTED.pattern, seen).groups())
        assert all(listening(port) for port in ports)
        wait_for(lines, FIRST_MOVE, seen)  # well inside the run: servers up, calls in flight
        process.send_signal(signum)
        stdout = process.stdout.read()
        process.wait(timeout=60)  # it stops Azurite and armsim gracefully
        while (line := lines.get(timeout=10)) is not None:
            seen.append(line)
    finally:
        process.kill()
    assert process.returncode == 130, "".join(seen)
    assert stdout == ""
    assert "interrupted" in seen[-1]
    assert_nothing_left(tmp, ports)


def test_verdicts_read_as_plain_words():
    assert describe_verdict(None) == "not assessed yet"
    assert describe_verdict("{not json") == "not assessed yet"
    body = json.dumps({"balanced": False, "decision": "wait", "reason": "cooldown", "detail": ""})
    assert "cooldown" in describe_verdict(body)
    body = json.dumps(
        {"balanced": False, "decision": "skip", "reason": "no_eligible_source", "detail": "x"}
    )
    assert describe_verdict(body) == "skip (no eligible source): x"


def test_without_azurite_the_demo_says_what_is_wrong_and_leaves_nothing(tmp):
    env = {**os.environ, "TMPDIR": str(tmp), "AZURITE_TABLE": str(tmp / "missing")}
    result = subprocess.run(
        [sys.executable, "-m", "rebalancer", "demo", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"rebalancer demo: AZURITE_TABLE={str(tmp / 'missing')!r} is not a file"
    )
    assert list(tmp.iterdir()) == []


def test_each_scale_set_gets_a_one_line_story():
    from datetime import UTC, datetime

    from devkit.demo import OperationView, SetSummary
    from devkit.demo_cli import story

    def summary(mode: str, operations: tuple[OperationView, ...], **counts: Any) -> SetSummary:
        return SetSummary(
            name="web",
            id="/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/"
            "virtualMachineScaleSets/web",
            orchestration="Uniform",
            mode=mode,
            before=counts.get("before", {"1": 1, "2": 3}),
            after=counts.get("after", {"1": 2, "2": 2}),
            balanced=True,
            operations=operations,
            protected_before=("web_1",),
            protected_after=("web_1",),
        )

    def operation(state: str, moves: int) -> OperationView:
        at = datetime(2026, 11, 20, 9, tzinfo=UTC)
        return OperationView("op", state, False, moves, "moves_done", at, "done")

    moved = story(summary("enforce", (operation("succeeded", 1), operation("rolled_back", 0))))
    assert moved == (
        "1 VM(s) moved, each new VM healthy before its source was deleted; "
        "1 operation(s) ended rolled_back; its 1 protected VMs kept"
    )
    assert story(summary("audit", ())) == "not opted in: reported, never changed"
    assert story(summary("enforce", ())) == "already balanced: left alone"
    held = replace(summary("enforce", ()), balanced=False, reason="autoscale_at_maximum")
    assert story(held).startswith("left alone (autoscale_at_maximum)")
    assert "raise that maximum" in story(held)


def test_the_live_view_draws_each_zone_as_a_bar_with_the_operation_under_it():
    from datetime import UTC, datetime, timedelta
    from types import MappingProxyType

    from rich.console import Console

    from devkit.demo import Frame, OperationView, SetView, VmMark
    from devkit.demo_cli import LiveView

    at = datetime(2026, 11, 20, 9, 6, tzinfo=UTC)
    moving = OperationView(
        "op1", "scaling_out", True, 0, "scale_out_requested", at, "capacity raised 15 -> 16"
    )
    web = SetView(
        name="web",
        id="/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/"
        "virtualMachineScaleSets/web",
        orchestration="Uniform",
        mode="enforce",
        tag="enabled",
        zones=MappingProxyType(
            {
                "1": (VmMark.RUNNING, VmMark.NEW),
                "2": (VmMark.PROTECTED,) + (VmMark.RUNNING,) * 5,
                "3": (VmMark.RUNNING,) * 5 + (VmMark.DELETING,),
            }
        ),
        counts=MappingProxyType({"1": 2, "2": 6, "3": 5}),
        protected=("web_2",),
        operations=(moving,),
        verdict="out of balance",
    )
    frame = Frame(at, timedelta(minutes=6), 12, 3, (web,), ("web: operation scaling_out",))
    console = Console(record=True, width=100, color_system=None)
    view = LiveView(console)
    view.news.append("09:06:00  web: operation scaling_out")
    console.print(view.render(frame))
    text = console.export_text()
    assert "web (Uniform, enforce) out of balance" in text
    assert "│ zone 1 │ ████" in text and "│ 2 │" in text
    assert "│ zone 3 │ ██████████░░ " in text  # five running, one being deleted
    assert "scaling_out (scale_out_requested): capacity" in text
    assert "09:06:00 virtual time (+6m00s), tick 12, 3 Event Grid events delivered" in text


def test_the_demo_s_self_check_names_a_broken_invariant(store):
    """The judge the demo runs over its fleet is the suites' own: a VM the app's identity
    deletes with no operation asking for it, a protected one, is named by rule."""
    from armsim import ArmSim
    from devkit.demo import RESOURCE_GROUP, _self_check, demo_env, scenario
    from devkit.invariants import Invariants
    from rebalancer.settings import load_settings

    with ArmSim.start(scenario()) as sim:
        judge = Invariants.watch(sim, store, load_settings(demo_env(sim)))
        assert _self_check(judge, settled=True) == ()
        api = sim.scale_set(RESOURCE_GROUP, "api")
        protected = next(vm for vm in api.vms if vm.protect_from_scale_in)
        app = sim.scenario.app_principal_id
        sim.actor.delete_instances(RESOURCE_GROUP, "api", [protected.instance_id], principal_id=app)
        sim.advance(600)
        broken = _self_check(judge, settled=True)
    assert any(line.startswith("[2]") and "protected" in line for line in broken), broken
    assert any(line.startswith("[1]") and "no operation record" in line for line in broken)
