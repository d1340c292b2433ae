"""The real decorated functions from `app.get_functions()`, fed as the Functions host feeds
them: Event Grid payloads and timer payloads decoded by the azure.functions converters."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from armsim import ScaleSetSpec, Scenario, ZoneCapacity
from devkit.host import Host, decode_event, indexed_functions
from devkit.stack import Stack, running_stack
from rebalancer import service
from rebalancer.azure_operations import (
    EVENT_GRID_FUNCTION_NAME,
    FOLLOW_UP_FUNCTION_NAME,
    HANDLED_OPERATION_NAMES,
    TIMER_FUNCTION_NAME,
)

EVENTS = Path(__file__).parent / "data" / "events"
FUNCTIONS = indexed_functions()


HOST = Host()
"""Invokes the functions on the runtime a test installs (`install`), else on the app settings'."""


def call_event(payload: dict[str, Any]) -> None:
    HOST.event(payload)


def call_timer(past_due: bool = False) -> None:
    HOST.timer(past_due)


@pytest.fixture(autouse=True)
def _reset_runtime() -> Iterator[None]:
    HOST.runtime = None
    service.forget_app_settings()
    yield
    HOST.runtime = None
    service.forget_app_settings()


@pytest.fixture
def store(store_factory):
    return store_factory()


def install(stack: Stack) -> None:
    HOST.runtime = stack.runtime()


def test_bindings():
    assert set(FUNCTIONS) == {
        EVENT_GRID_FUNCTION_NAME,
        TIMER_FUNCTION_NAME,
        FOLLOW_UP_FUNCTION_NAME,
    }
    (event_binding,) = FUNCTIONS[EVENT_GRID_FUNCTION_NAME].get_bindings()
    assert event_binding.type == "eventGridTrigger"
    assert event_binding.name == "event"
    (timer_binding,) = FUNCTIONS[TIMER_FUNCTION_NAME].get_bindings()
    assert timer_binding.type == "timerTrigger"
    assert timer_binding.get_dict_repr()["schedule"] == "%REBALANCER_TIMER_SCHEDULE%"


_WHAT_IS_IMPORTED = """\
import json, sys
import function_app
app = set(sys.modules)
from rebalancer import service
service.runtime_from_settings({
    "REBALANCER_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
})
print(json.dumps({"app": sorted(app), "runtime": sorted(sys.modules)}))
"""


def test_a_cold_start_imports_each_sdk_only_when_it_is_first_used():
    """A fresh worker: the app imports azure.functions and nothing heavy; building the runtime
    imports no credential, no Compute SDK and no notifier (no topic is configured). Each comes
    on its first use (the first token, the first ARM call, the first event)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _WHAT_IS_IMPORTED],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    modules = json.loads(done.stdout.strip().splitlines()[-1])

    def loaded(step: str, prefixes: tuple[str, ...]) -> list[str]:
        return [name for name in modules[step] if name.startswith(prefixes)]

    assert loaded("app", ("azure.core", "azure.data", "azure.mgmt", "requests")) == []
    assert loaded("app", ("rebalancer.",)) == ["rebalancer.azure_operations"]
    assert loaded("runtime", ("azure.identity", "azure.mgmt", "azure.eventgrid")) == []
    assert loaded("runtime", ("azure.storage.queue",)) == []
    assert loaded("runtime", ("rebalancer.notify", "rebalancer.events")) == []


def test_bad_settings_make_the_functions_refuse_to_act(monkeypatch, caplog):
    monkeypatch.setenv("REBALANCER_SUBSCRIPTION_ID", "5e8a1b2c-3d4e-4f50-8a61-7b8c9d0e1f2a")
    monkeypatch.setenv("REBALANCER_MODE", "sometimes")
    (payload,) = json.loads((EVENTS / "vmss-write-capacity.json").read_text())
    with caplog.at_level(logging.ERROR, logger="rebalancer"):
        call_event(payload)
        call_timer()
    assert "REBALANCER_MODE='sometimes'" in caplog.text
    assert "one of off, audit, enforce" in caplog.text


def drive(stack: Stack, queue: list[dict[str, Any]], ticks: int, step: float = 30.0) -> None:
    """Deliver what armsim emitted (each event twice: Event Grid delivers at least once),
    tick the timer, let virtual time pass."""
    for _ in range(ticks):
        while queue:
            payload = queue.pop(0)
            call_event(payload)
            call_event(payload)
        call_timer()
        stack.sim.advance(step)


def test_end_to_end_a_scale_out_into_a_constrained_zone_is_rebalanced(store):
    scenario = Scenario(
        capacity=(ZoneCapacity("westeurope", "Standard_D2s_v5", "1", 0),),
        scale_sets=(
            ScaleSetSpec(
                "web", "rg-web", counts={"1": 2, "2": 2, "3": 2}, tags={"zone-rebalance": "enabled"}
            ),
        ),
    )
    with running_stack(scenario, store, cooldown_minutes="10") as stack:
        install(stack)
        queue: list[dict[str, Any]] = []
        stack.sim.add_event_sink(queue.append)
        stack.sim.actor.set_capacity("rg-web", "web", 9)  # zone 1 is full: lands in 2 and 3
        stack.sim.advance(120)
        drive(stack, queue, 5)
        counts = stack.counts("rg-web", "web")
        assert counts["1"] == 2 and max(counts.values()) - min(counts.values()) > 1
        assert not store.active_operations()  # cooldown after the outside scale-out
        stack.sim.actor.set_zone_room("westeurope", "Standard_D2s_v5", "1", 10)
        drive(stack, queue, 120)
        counts = stack.counts("rg-web", "web")
        assert sorted(counts.values()) == [3, 3, 3], counts
        assert stack.sim.scale_set("rg-web", "web").capacity == 9
        history = store.history(stack.sim.scale_set("rg-web", "web").id.lower())
        assert history and all(row.state == "succeeded" for row in history)


ids = st.one_of(st.none(), st.integers(), st.text(max_size=30), st.just("/" + "x" * 3000))
resource_ids = st.one_of(
    ids,
    st.builds(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{}".format,
        st.sampled_from(["00000000-0000-4000-8000-000000000001", "other"]),
        st.sampled_from(["rg-web", "rg-other", "RG-OTHER"]),
        st.sampled_from(["web", "outside"]),
    ),
)
payloads = st.fixed_dictionaries(
    {
        "id": ids,
        "eventType": st.one_of(
            ids,
            st.sampled_from(
                [
                    "Microsoft.Resources.ResourceWriteSuccess",
                    "Microsoft.Resources.ResourceActionSuccess",
                    "Microsoft.Resources.ResourceDeleteFailure",
                ]
            ),
        ),
        "subject": resource_ids,
        "eventTime": st.one_of(ids, st.just("2026-11-20T09:14:03.5521987Z")),
        "dataVersion": st.just("2"),
        "metadataVersion": st.just("1"),
        "topic": ids,
        "data": st.one_of(
            ids,
            st.fixed_dictionaries(
                {
                    "operationName": st.one_of(ids, st.sampled_from(HANDLED_OPERATION_NAMES)),
                    "resourceUri": resource_ids,
                    "claims": st.one_of(ids, st.dictionaries(st.text(max_size=5), ids, max_size=3)),
                }
            ),
        ),
    }
)


def test_no_event_makes_the_handler_raise_or_act_outside_scope(store):
    """Random and hostile event shapes: the handler acknowledges them (or raises only a
    transient failure), and never writes to a scale set outside the configured scope."""
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec(
                "outside",
                "rg-other",
                counts={"1": 0, "2": 3, "3": 3},
                tags={"zone-rebalance": "enabled"},
            ),
            ScaleSetSpec(
                "web", "rg-web", counts={"1": 2, "2": 2, "3": 2}, tags={"zone-rebalance": "enabled"}
            ),
        )
    )
    with running_stack(scenario, store, resource_groups="rg-web", cooldown_minutes="0") as stack:
        install(stack)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(payloads)
        def check(payload: dict[str, Any]) -> None:
            try:
                event = decode_event(payload)
            except (TypeError, ValueError):
                return  # the host cannot decode it either: the function is never called
            with contextlib.suppress(service.TransientFailure):
                HOST.deliver(event)

        check()
        writes = [r for r in stack.sim.requests if r.method in ("PUT", "PATCH", "POST", "DELETE")]
        assert not [w for w in writes if "rg-other" in w.path.lower()]
        assert stack.counts("rg-other", "outside") == {"1": 0, "2": 3, "3": 3}


def test_a_timer_tick_survives_azure_refusing_the_subscription_listing(store, caplog):
    scenario = Scenario(
        scale_sets=(ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 1, "3": 1}),)
    )
    with running_stack(scenario, store, resource_groups="rg-web,rg-gone") as stack:
        install(stack)
        stack.sim.faults.add(kind="error", operation="vmss.list", status=500, count=100)
        with caplog.at_level(logging.ERROR, logger="rebalancer"):
            call_timer()  # must not raise: the next tick tries again
        assert "timer tick stopped: Azure Compute" in caplog.text
        stack.sim.faults.clear()
        call_timer(past_due=True)
        assert store.last_assessment(stack.sim.scale_set("rg-web", "web").id.lower()) is not None
