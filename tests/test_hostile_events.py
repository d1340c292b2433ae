"""Events Event Grid would retry for a day if the function raised: each one is understood or
acknowledged, through the real Event Grid function, Azurite and armsim."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from armsim import ScaleSetSpec, Scenario, VmOverride
from devkit.host import Host
from devkit.stack import Stack, running_stack
from rebalancer import service

OBJECT_ID_CLAIM = "http://schemas.microsoft.com/identity/claims/objectidentifier"
HOST = Host()


def call_event(payload: dict[str, Any]) -> None:
    HOST.event(payload)


@pytest.fixture(autouse=True)
def _reset_runtime() -> Iterator[None]:
    HOST.runtime = None
    service.forget_app_settings()
    yield
    HOST.runtime = None
    service.forget_app_settings()


SCENARIO = Scenario(
    scale_sets=(
        ScaleSetSpec("web", "rg-web", counts={"1": 2, "2": 2, "3": 2}),
        ScaleSetSpec("api", "rg-web", counts={"1": 1, "2": 1, "3": 1}),
        ScaleSetSpec(
            "db",
            "rg-web",
            mode="Flexible",
            counts={"1": 1, "2": 1, "3": 1},
            overrides=(VmOverride(instance="0", name="primary-db"),),
        ),
    )
)


@pytest.fixture
def stack(store) -> Iterator[Stack]:
    with running_stack(SCENARIO, store) as stack:
        HOST.runtime = stack.runtime()
        yield stack


def outside_write(stack: Stack, name: str = "web") -> dict[str, Any]:
    """The event armsim publishes for a person's capacity change on the scale set."""
    queue: list[dict[str, Any]] = []
    stack.sim.add_event_sink(queue.append)
    capacity = stack.sim.scale_set("rg-web", name).capacity
    stack.sim.actor.set_capacity("rg-web", name, capacity, principal_id="someone-else")
    stack.sim.advance(10)
    stack.sim.flush_events()
    stack.sim.remove_event_sink(queue.append)
    (payload,) = [p for p in queue if p["subject"].lower().endswith(f"/{name}")]
    return payload


def activity(stack: Stack, name: str) -> Any:
    return stack.store.last_activity(stack.sim.scale_set("rg-web", name).id.lower())


def renamed(payload: dict[str, Any], name: str) -> dict[str, Any]:
    hostile = copy.deepcopy(payload)
    for holder, key in ((hostile, "subject"), (hostile["data"], "resourceUri")):
        holder[key] = holder[key].rsplit("/", 1)[0] + "/" + name
    return hostile


def test_a_scale_set_name_too_long_for_a_table_key_is_acknowledged(stack, caplog):
    hostile = renamed(outside_write(stack), "w" * 1500)
    with caplog.at_level(logging.INFO, logger="rebalancer"):
        call_event(hostile)  # raising would make Event Grid retry it for 24 hours
    assert hostile["id"] in caplog.text
    assert "longer than Azure allows" in caplog.text


def test_an_event_id_too_long_for_a_table_key_is_handled_once(stack, caplog):
    payload = outside_write(stack)
    payload["id"] = "e" * 2000
    with caplog.at_level(logging.INFO, logger="rebalancer"):
        call_event(payload)
        assert activity(stack, "web") is not None
        caplog.clear()
        call_event(payload)  # a redelivery is recognised as one
    assert "already handled (duplicate delivery)" in caplog.text


def test_events_without_an_id_are_not_all_taken_for_one(stack):
    web, api = outside_write(stack, "web"), outside_write(stack, "api")
    for payload in (web, api):
        del payload["id"]
        call_event(payload)
    assert activity(stack, "web") is not None
    assert activity(stack, "api") is not None


def test_an_event_time_in_the_future_counts_from_when_it_arrived(stack):
    payload = outside_write(stack)
    payload["eventTime"] = "2999-01-01T00:00:00Z"
    call_event(payload)
    assert activity(stack, "web") == stack.sim.clock.now()


def test_the_apps_own_write_is_recognised_by_a_principal_id_without_dashes(stack):
    payload = outside_write(stack)
    del payload["data"]["claims"][OBJECT_ID_CLAIM]
    evidence = payload["data"]["authorization"]["evidence"]
    evidence["principalId"] = stack.settings.app_principal_id.replace("-", "").upper()
    call_event(payload)
    assert activity(stack, "web") is None


def test_a_custom_named_flexible_vm_maps_to_its_scale_set_by_reference(stack):
    queue: list[dict[str, Any]] = []
    stack.sim.add_event_sink(queue.append)
    stack.sim.actor.deallocate("rg-web", "db", "primary-db", principal_id="someone-else")
    stack.sim.advance(60)
    stack.sim.flush_events()
    (payload,) = queue
    assert payload["subject"].endswith("/virtualMachines/primary-db")
    call_event(payload)
    assert activity(stack, "db") is not None
