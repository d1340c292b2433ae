"""Scenarios from files and code: the shipped examples load, bad ones say what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from armsim import ArmSim, ScaleSetSpec, Scenario, ScenarioError, VmOverride, load_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "scenarios"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.*")), ids=lambda p: p.name)
def test_shipped_scenarios_load_and_seed(path: Path) -> None:
    scenario = load_scenario(path)
    sim = ArmSim(scenario)
    assert sim.state, f"{path.name} has no scale sets"
    for spec in scenario.scale_sets:
        view = sim.scale_set(spec.resource_group, spec.name)
        assert len(view.vms) == sum(spec.counts.values())


def test_uniform_example_overrides() -> None:
    sim = ArmSim(load_scenario(EXAMPLES / "uniform-2-4-7.toml"))
    web = sim.scale_set("rg-web", "web")
    assert web.zone_counts() == {"1": 2, "2": 4, "3": 7}
    assert web.vm("12").protect_from_scale_in
    zone3 = [vm for vm in web.vms if vm.zone == "3"]
    assert [vm.health for vm in zone3].count("unhealthy") == 2
    assert sim.world.scale_sets["rg-web/web"].terminate_notification_seconds == 300


def test_overrides_by_zone_and_instance() -> None:
    spec = ScaleSetSpec(
        "web",
        "rg",
        counts={"1": 3, "2": 1},
        zones=("1", "2"),
        overrides=(
            VmOverride(zone="1", count=2, power_state="deallocated"),
            VmOverride(instance="3", provisioning_state="Failed"),
            VmOverride(zone="1", count=1, latest_model=False, health="unhealthy"),
        ),
    )
    web = ArmSim(Scenario(scale_sets=(spec,))).scale_set("rg", "web")
    assert [vm.power_state for vm in web.vms[:2]] == ["deallocated", "deallocated"]
    assert web.vms[0].health is None
    assert (web.vms[2].latest_model, web.vms[2].health) == (False, "unhealthy")
    assert web.vm("3").provisioning_state == "Failed"
    assert web.vm("3").failure_code == "VMExtensionProvisioningError"
    assert web.zone_counts() == {"1": 3, "2": 1}  # a failed extension still counts


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"scale_set": []}, "unknown key 'scale_set'"),
        ({"scale_sets": [{"name": "a"}]}, "missing required key 'resource_group'"),
        ({"scale_sets": [{"name": "a", "resource_group": "r", "mode": "Flex"}]}, "mode must be"),
        (
            {"scale_sets": [{"name": "a", "resource_group": "r", "counts": {"4": 1}}]},
            "zone '4' not in zones",
        ),
        (
            {"scale_sets": [{"name": "a", "resource_group": "r", "counts": {"1": "x"}}]},
            "expected an integer",
        ),
        (
            {"scale_sets": [{"name": "a", "resource_group": "r", "terminate_notification": "5m"}]},
            "ISO 8601 duration",
        ),
        ({"faults": [{"kind": "explode"}]}, "unknown fault kind"),
        ({"throttle_header_style": "2020"}, "throttle_header_style must be one of"),
        ({"start": "yesterday"}, "not an ISO 8601 time"),
        (
            {
                "scale_sets": [
                    {
                        "name": "a",
                        "resource_group": "r",
                        "mode": "Flexible",
                        "health_monitoring": "probe",
                    }
                ]
            },
            "only the health extension",
        ),
    ],
)
def test_bad_scenarios_name_the_problem(data: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        Scenario.from_dict(data)


def test_bad_file_reports_path_and_problem(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[[scale_sets]\nname = 1\n")
    with pytest.raises(ScenarioError, match=r"broken\.toml: not valid toml"):
        load_scenario(broken)
    missing = tmp_path / "missing.json"
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(missing)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        json.dumps(
            {"scale_sets": [{"name": "a", "resource_group": "r", "overrides": [{"instance": "9"}]}]}
        )
    )
    with pytest.raises(ScenarioError, match="instance '9' does not exist"):
        ArmSim(load_scenario(wrong))
