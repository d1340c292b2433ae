"""Recorded real Azure traffic (tests/data/real-azure) against the product and armsim.

(a) Each recorded answer is replayed through the Compute adapter's own HTTP stack (its
    pipeline, retry policy and transport; only the urllib3 pool under the transport is
    replaced by the recording, tests/answering.py), and what the product parses must equal
    what the recording says.
(b) The same request goes to armsim: the status code, the JSON paths the product reads and the
    header names it reads must be the same as in the recording.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from azure.core.credentials import AccessToken

from armsim import ArmSim, ScaleSetSpec, Scenario
from armsim.auth import make_token
from rebalancer import arm
from rebalancer.compute import ArmConfig, ComputeAdapter, OperationState
from rebalancer.model import Health, HealthMonitoring, OrchestrationMode, ScaleSetRef
from tests.answering import Answer, Answering, answer_through

RECORDINGS = Path(__file__).parent / "data" / "real-azure"
NOW = datetime(2024, 8, 26, 8, 35, tzinfo=UTC)

SCALE_SET_READS = (
    "id",
    "name",
    "type",
    "location",
    "tags",
    "sku.name",
    "sku.capacity",
    "etag",
    "properties.orchestrationMode",
    "properties.provisioningState",
)
VM_READS = (
    "value[].name",
    "value[].id",
    "value[].type",
    "value[].instanceId",
    "value[].properties.provisioningState",
    "value[].properties.latestModelApplied",
    "value[].properties.timeCreated",
)
STATUS_READS = ("status",)
HEADERS_READ = ("etag", "azure-asyncoperation", "location", "retry-after")


def load(name: str) -> dict[str, Any]:
    return json.loads((RECORDINGS / name).read_text())


def interaction(recording: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    return next(i for i in recording["interactions"] if i["name"] == name)


class Replay:
    """Answers from a recording, in recorded order per method and path.

    The product's PATCH of the capacity is answered with the recorded capacity write (a PUT by
    `az vmss scale`): both answer the scale set with the same long-running operation headers.
    """

    def __init__(self, interactions: list[Mapping[str, Any]]) -> None:
        self.pending = list(interactions)
        self.sent: list[tuple[str, str]] = []

    def answer(self, method: str, url: str, headers: Any, body: Any) -> Answer:
        path = urlsplit(url).path.lower()
        recorded_method = "PUT" if method == "PATCH" else method
        self.sent.append((method, path))
        for index, recorded in enumerate(self.pending):
            if (recorded["request"]["method"], _path(recorded)) == (recorded_method, path):
                del self.pending[index]
                return self._response(recorded["response"])
        raise AssertionError(f"no recorded answer left for {method} {path}")

    @staticmethod
    def _response(recorded: Mapping[str, Any]) -> Answer:
        body = recorded.get("body")
        content = b"" if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json; charset=utf-8", **recorded["headers"]}
        return recorded["status"], headers, content


def _path(recorded: Mapping[str, Any]) -> str:
    return urlsplit(recorded["request"]["uri"]).path.lower()


class _Token:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("recorded", 4102444800)


class ReplayedAdapter(ComputeAdapter):
    """The product's adapter; only the urllib3 pool under its transport plays a recording."""

    def __init__(self, replay: Replay, subscription_id: str) -> None:
        super().__init__(ArmConfig(subscription_id=subscription_id), _Token())
        self.replay = replay

    def _transport(self) -> Any:
        return answer_through(super()._transport(), Answering(self.replay.answer))


@pytest.fixture
def create_and_modify() -> Iterator[tuple[dict[str, Any], ReplayedAdapter, ScaleSetRef]]:
    recording = load("azure-cli-vmss-create-and-modify.json")
    ref = ScaleSetRef.parse(interaction(recording, "scale_set_before")["response"]["body"]["id"])
    with ReplayedAdapter(Replay(recording["interactions"]), ref.subscription_id) as adapter:
        yield recording, adapter, ref


def test_provenance_names_repo_path_and_commit() -> None:
    for path in sorted(RECORDINGS.glob("azure-cli-*.json")):
        provenance = json.loads(path.read_text())["provenance"]
        assert provenance["repo"] and provenance["path"].endswith(".yaml"), path.name
        assert len(provenance["commit"]) == 40, path.name


# --- (a) the product's parse of each recorded answer ---------------------------------------


def test_replayed_reads_parse_as_recorded(create_and_modify) -> None:  # type: ignore[no-untyped-def]
    recording, adapter, ref = create_and_modify
    recorded = interaction(recording, "scale_set_before")["response"]
    scale_set = adapter.get_scale_set(ref)
    body = recorded["body"]
    assert scale_set.capacity == body["sku"]["capacity"] == 5
    assert scale_set.etag == body["etag"] == recorded["headers"]["etag"] == '"4"'
    assert scale_set.mode is OrchestrationMode.UNIFORM
    assert scale_set.provisioning_state == body["properties"]["provisioningState"]
    assert scale_set.sku_name == body["sku"]["name"] and scale_set.location == body["location"]
    assert scale_set.zones == () and scale_set.health_monitoring is HealthMonitoring.NONE

    inventory = adapter.read_inventory(ref, NOW, scale_set=scale_set)
    items = interaction(recording, "vm_list")["response"]["body"]["value"]
    assert [i.id for i in inventory.instances] == [item["instanceId"] for item in items]
    assert [i.provisioning_state for i in inventory.instances] == [
        item["properties"]["provisioningState"] for item in items
    ]
    assert [i.name for i in inventory.instances] == [item["name"] for item in items]
    assert all(i.health is Health.NOT_REPORTED and i.zone is None for i in inventory.instances)
    assert [i.created is not None for i in inventory.instances] == [
        "timeCreated" in item["properties"] for item in items
    ]


def test_replayed_capacity_write_is_followed_to_its_recorded_end(create_and_modify) -> None:  # type: ignore[no-untyped-def]
    recording, adapter, ref = create_and_modify
    seen = adapter.get_scale_set(ref)
    adapter.read_inventory(ref, NOW, scale_set=seen)  # the recorded order: read, list, write
    recorded = interaction(recording, "capacity_write")["response"]
    call = adapter.set_capacity(ref, 4, etag='"4"')
    assert call.status_code == recorded["status"] == 200
    assert call.async_operation_url == recorded["headers"]["azure-asyncoperation"]
    assert call.location_url is None and not call.synchronous
    first = adapter.operation_status(call)
    assert first.state is OperationState.IN_PROGRESS and first.retry_after is None
    assert adapter.operation_status(call).state is OperationState.SUCCEEDED
    after = adapter.get_scale_set(ref)
    assert (after.capacity, after.etag) == (4, '"5"')
    assert adapter.replay.pending == []


def test_parse_of_the_recorded_documents_without_the_sdk() -> None:
    recording = load("azure-cli-vmss-create-and-modify.json")
    write = interaction(recording, "capacity_write")["response"]["body"]
    parsed = arm.parse_scale_set(write)
    assert (parsed.capacity, parsed.provisioning_state, parsed.etag) == (4, "Updating", '"5"')


# --- (b) the same requests to armsim -------------------------------------------------------


def _paths(document: Any, prefix: str = "") -> set[str]:
    """Every JSON path in `document`, lists as `[]`."""
    found: set[str] = set()
    if isinstance(document, Mapping):
        for key, value in document.items():
            path = f"{prefix}.{key}" if prefix else key
            found.add(path)
            found |= _paths(value, path)
    elif isinstance(document, list):
        for item in document:
            found |= _paths(item, f"{prefix}[]")
    return found


def _same_reads(recorded: Any, simulated: Any, reads: tuple[str, ...]) -> list[str]:
    have, want = _paths(simulated), _paths(recorded)
    return [path for path in reads if path in want and path not in have]


@pytest.mark.integration
def test_armsim_answers_the_recorded_requests_alike() -> None:
    recording = load("azure-cli-vmss-create-and-modify.json")
    before = interaction(recording, "scale_set_before")
    ref = ScaleSetRef.parse(before["response"]["body"]["id"])
    spec = ScaleSetSpec(
        ref.name,
        ref.resource_group,
        location="westus",
        sku="Standard_DS1_v2",
        zones=(),
        counts={"": 5},
        health_monitoring="none",
    )
    scenario = Scenario(subscription_id=ref.subscription_id, scale_sets=(spec,))
    with ArmSim.start(scenario) as sim:
        token = make_token(sim.scenario.app_principal_id, sim.scenario.tenant_id)
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        session.verify = sim.ca_cert_path
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override `verify`

        def send(recorded: Mapping[str, Any], **kw: Any) -> requests.Response:
            parts = urlsplit(recorded["request"]["uri"])
            url = f"{sim.endpoint}{parts.path}?{parts.query}"
            return session.request(recorded["request"]["method"], url, timeout=10, **kw)

        def compare(name: str, answer: requests.Response, reads: tuple[str, ...]) -> None:
            recorded = interaction(recording, name)["response"]
            assert answer.status_code == recorded["status"], name
            missing = _same_reads(recorded["body"], answer.json() if answer.content else {}, reads)
            assert missing == [], f"{name}: armsim lacks {missing}"
            if recorded.get("headers_not_kept"):
                return
            names = {h.lower() for h in answer.headers}
            assert [h for h in HEADERS_READ if h in recorded["headers"] and h not in names] == []
            assert [h for h in HEADERS_READ if h not in recorded["headers"] and h in names] == []

        compare("scale_set_before", send(before), SCALE_SET_READS)
        compare("vm_list", send(interaction(recording, "vm_list")), VM_READS)
        write = interaction(recording, "capacity_write")
        patch = {"sku": {"capacity": 4}}
        answer = session.patch(
            f"{sim.endpoint}{urlsplit(write['request']['uri']).path}?api-version=2024-11-01",
            json=patch,
            timeout=10,
        )
        compare("capacity_write", answer, SCALE_SET_READS)
        status_url = answer.headers["Azure-AsyncOperation"]
        polled = session.get(status_url, timeout=10)
        compare("status_in_progress", polled, STATUS_READS)
        sim.clock.advance(600)
        compare("status_succeeded", session.get(status_url, timeout=10), STATUS_READS)
        compare("scale_set_after", send(interaction(recording, "scale_set_after")), SCALE_SET_READS)
