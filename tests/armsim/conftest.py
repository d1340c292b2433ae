"""Fixtures for the armsim conformance suite: a simulator per test, driven through the SDK."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from armsim import ArmSim, ScaleSetSpec, Scenario, VmOverride

SimFactory = Callable[..., ArmSim]


def web_scenario(**kwargs: object) -> Scenario:
    """A Uniform set at 2/4/7 (one protected VM in zone 3) and a Flexible set at 1/1/2.

    The Uniform set does not overprovision, so tests can name the instance ids a scale-out
    creates; tests/armsim/test_scale_sets.py covers overprovisioning (Azure's default)."""
    scale_sets = (
        ScaleSetSpec(
            "web",
            "rg-web",
            overprovision=False,
            counts={"1": 2, "2": 4, "3": 7},
            tags={"zone-rebalance": "enabled"},
            overrides=(VmOverride(instance="12", protect_from_scale_in=True),),
        ),
        ScaleSetSpec("api", "rg-api", mode="Flexible", counts={"1": 1, "2": 1, "3": 2}),
    )
    values: dict[str, object] = {"scale_sets": scale_sets}
    values.update(kwargs)
    return Scenario(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_sim() -> Iterator[SimFactory]:
    """Start simulators on demand; all are stopped when the test ends."""
    started: list[ArmSim] = []

    def make(scenario: Scenario | None = None, **kwargs: object) -> ArmSim:
        sim = ArmSim.start(scenario or web_scenario(), **kwargs)  # type: ignore[arg-type]
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(make_sim: SimFactory) -> ArmSim:
    return make_sim()


@pytest.fixture
def compute(sim: ArmSim):  # type: ignore[no-untyped-def]
    """The real ComputeManagementClient pointed at `sim`, without retries (tests see errors)."""
    return sim.compute_client(retry_total=0)
