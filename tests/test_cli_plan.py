"""`python -m rebalancer plan` as a user runs it: on the shipped examples, and on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def plan(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rebalancer", "plan", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "120"},
    )


def example(case: str, form: str) -> tuple[Path, Path]:
    suffix = {"rest": "", "az": ".az"}[form]
    folder = EXAMPLES / case
    return folder / f"vmss{suffix}.json", folder / f"instances{suffix}.json"


def zones(*counts: tuple[int, int]) -> dict[str, dict[str, int]]:
    return {str(n): {"total": t, "active": a} for n, (t, a) in enumerate(counts, start=1)}


def moves(*triples: tuple[str, str, str]) -> list[dict[str, str]]:
    return [{"fromZone": f, "toZone": t, "source": s} for f, t, s in triples]


EXPECTED = {
    # 1/3/3: one move from zone 2 (ties with zone 3, first by name); zone 2's highest
    # instance id is protected (Uniform), so the next one goes
    "uniform-1-3-3": {
        "balanced": False,
        "zones": zones((1, 1), (3, 3), (3, 3)),
        "decision": "move",
        "reason": "moves_planned",
        "moves": moves(("2", "1", "3")),
    },
    "flexible-1-3-3": {
        "balanced": False,
        "zones": zones((1, 1), (3, 3), (3, 3)),
        "decision": "move",
        "reason": "moves_planned",
        "moves": moves(("2", "1", "api_f5a6d120")),
    },
    # 5/5/5 with zone 3 all deallocated: balanced by total, nothing to do
    **{
        f"{mode}-5-5-5-deallocated": {
            "balanced": True,
            "zones": zones((5, 5), (5, 5), (5, 0)),
            "decision": "none",
            "reason": "balanced",
            "moves": [],
        }
        for mode in ("uniform", "flexible")
    },
    # 7 (2 active + 5 deallocated)/4/4: a move would worsen the active spread
    **{
        f"{mode}-7-4-4": {
            "balanced": False,
            "zones": zones((7, 2), (4, 4), (4, 4)),
            "decision": "skip",
            "reason": "active_spread",
            "moves": [],
        }
        for mode in ("uniform", "flexible")
    },
    # 2/4/7 (5 active + 2 deallocated): two moves into zone 1, ending at 4/4/5; the
    # unhealthy VM goes first, then (Uniform) the one not on the latest model
    "uniform-2-4-7": {
        "balanced": False,
        "zones": zones((2, 2), (4, 4), (7, 5)),
        "decision": "move",
        "reason": "moves_planned",
        "moves": moves(("3", "1", "9"), ("3", "1", "5")),
    },
    "flexible-2-4-7": {
        "balanced": False,
        "zones": zones((2, 2), (4, 4), (7, 5)),
        "decision": "move",
        "reason": "moves_planned",
        "moves": moves(("3", "1", "api_4c8fe369"), ("3", "1", "api_e2eca380")),
    },
}


@pytest.mark.parametrize("form", ["rest", "az"])
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_json_answer_for_each_documented_case(case: str, form: str) -> None:
    scale_set, instances = example(case, form)
    result = plan("--scale-set", scale_set, "--instances", instances, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == EXPECTED[case]


def test_the_az_and_rest_examples_hold_the_same_vms_in_both_list_forms() -> None:
    for case in EXPECTED:
        rest = json.loads(example(case, "rest")[1].read_text())
        az = json.loads(example(case, "az")[1].read_text())
        assert isinstance(rest, dict) and isinstance(rest["value"], list)
        assert isinstance(az, list)
        assert all("properties" in vm for vm in rest["value"])
        assert not any("properties" in vm for vm in az)
        assert [vm["name"] for vm in rest["value"]] == [vm["name"] for vm in az]


def test_the_table_shows_zones_decision_reason_and_moves() -> None:
    scale_set, instances = example("uniform-2-4-7", "rest")
    result = plan("--scale-set", scale_set, "--instances", instances)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "decision: move (moves_planned)" in out
    assert "health unhealthy" in out
    assert "not on the latest model" in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    cells = [[cell.strip() for cell in row.strip("│").split("│")] for row in rows]
    assert ["3", "7", "5", "5", "3"] in cells  # zone 3: total, active, after
    assert ["1", "3", "1", "9", "health unhealthy"] in cells
    assert ["2", "3", "1", "5", "not on the latest model"] in cells


def test_the_table_reads_in_an_80_column_terminal(tmp_path: Path) -> None:
    """A custom-named Flexible VM (names go up to 64 characters) is shown whole."""
    scale_set, instances = example("flexible-2-4-7", "rest")
    document = json.loads(instances.read_text())
    long_name = "payments-api-primary-westeurope-zone3-" + "x" * 20
    for vm in document["value"]:
        if vm["name"] == "api_e2eca380":
            vm["name"] = long_name
            vm["id"] = vm["id"].replace("api_e2eca380", long_name)
    renamed = tmp_path / "instances.json"
    renamed.write_text(json.dumps(document))
    argv = ["plan", "--scale-set", str(scale_set), "--instances", str(renamed)]
    result = subprocess.run(
        [sys.executable, "-m", "rebalancer", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out and long_name in out, out
    assert "moves_planned" in out


def test_the_table_explains_a_skip() -> None:
    scale_set, instances = example("flexible-7-4-4", "az")
    result = plan("--scale-set", scale_set, "--instances", instances)
    assert result.returncode == 0, result.stderr
    assert "decision: skip (active_spread)" in result.stdout
    assert "worsen" in result.stdout
    assert "Moves" not in result.stdout


def test_the_readme_example_exists() -> None:
    assert (EXAMPLES / "uniform-2-4-7" / "vmss.json").is_file()
    assert (EXAMPLES / "uniform-2-4-7" / "instances.json").is_file()


# --- bad input: exit 2, one line naming the file and the problem -------------------------


def bad(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_usage_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rebalancer plan: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_file(tmp_path: Path) -> None:
    _, instances = example("uniform-1-3-3", "rest")
    missing = tmp_path / "vmss.json"
    result = plan("--scale-set", missing, "--instances", instances)
    assert_usage_error(result, str(missing), "file not found")


def test_invalid_json(tmp_path: Path) -> None:
    scale_set, _ = example("uniform-1-3-3", "rest")
    broken = bad(tmp_path, "vms.json", '[{"name": "web_0",]')
    result = plan("--scale-set", scale_set, "--instances", broken)
    assert_usage_error(result, str(broken), "not valid JSON", "line 1")


def test_a_vm_list_given_as_the_scale_set() -> None:
    _, instances = example("uniform-1-3-3", "az")
    result = plan("--scale-set", instances, "--instances", instances)
    assert_usage_error(result, str(instances), "not a scale set", "a JSON list")


def test_a_vm_given_as_the_scale_set(tmp_path: Path) -> None:
    _, instances = example("uniform-1-3-3", "rest")
    first_vm = json.loads(instances.read_text())["value"][0]
    path = bad(tmp_path, "vm.json", json.dumps(first_vm))
    result = plan("--scale-set", path, "--instances", instances)
    assert_usage_error(result, str(path), "not a scale set", "virtualMachineScaleSets")


def test_a_scale_set_given_as_the_vm_list() -> None:
    scale_set, _ = example("flexible-1-3-3", "rest")
    result = plan("--scale-set", scale_set, "--instances", scale_set)
    assert_usage_error(result, str(scale_set), "not a VM list", "single object")


def test_a_list_of_scale_sets_given_as_the_vm_list(tmp_path: Path) -> None:
    scale_set, _ = example("uniform-1-3-3", "az")
    listing = bad(tmp_path, "vmss-list.json", json.dumps([json.loads(scale_set.read_text())]))
    result = plan("--scale-set", scale_set, "--instances", listing)
    assert_usage_error(result, str(listing), "not a VM list", "Microsoft.Compute/virtual")


def test_vms_of_another_scale_set() -> None:
    scale_set, _ = example("uniform-1-3-3", "rest")
    _, other = example("flexible-1-3-3", "rest")
    result = plan("--scale-set", scale_set, "--instances", other)
    assert_usage_error(result, str(other), "belongs to scale set 'api'", "not to 'web'")


def test_a_standalone_vm_in_a_flexible_list(tmp_path: Path) -> None:
    scale_set, instances = example("flexible-1-3-3", "az")
    vms = json.loads(instances.read_text())
    vms[0].pop("virtualMachineScaleSet")
    edited = bad(tmp_path, "vms.json", json.dumps(vms))
    result = plan("--scale-set", scale_set, "--instances", edited)
    assert_usage_error(result, str(edited), vms[0]["name"], "no scale set")


def test_a_vm_without_an_id(tmp_path: Path) -> None:
    scale_set, _ = example("uniform-1-3-3", "rest")
    edited = bad(tmp_path, "vms.json", json.dumps({"value": [{"zones": ["1"]}]}))
    result = plan("--scale-set", scale_set, "--instances", edited)
    assert_usage_error(result, str(edited), "item 0", "instanceId")


def test_missing_arguments_are_a_usage_error() -> None:
    result = plan("--scale-set", "vmss.json")
    assert result.returncode == 2
    assert "--instances" in result.stderr


def test_the_table_warns_when_vms_lack_an_instance_view(tmp_path: Path) -> None:
    scale_set, instances = example("uniform-1-3-3", "rest")
    listing = json.loads(instances.read_text())
    for vm in listing["value"]:
        del vm["properties"]["instanceView"]
    edited = bad(tmp_path, "vms.json", json.dumps(listing))
    result = plan("--scale-set", scale_set, "--instances", edited)
    assert result.returncode == 0, result.stderr
    assert "7 VM(s) have no power state" in result.stdout
    assert "--expand instanceView" in result.stdout
