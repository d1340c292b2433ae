"""The adapter's reads as ARM JSON through azure-core's pipeline (rebalancer.compute.rest).

Reads parse the JSON Azure sent straight into the core's values; azure-mgmt-compute is only
imported for a write. The audit reading through the SDK's models is what cost most of its CPU
and of a cold start's first tick (docs/performance.md).
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken

from armsim import ArmSim, ScaleSetSpec, Scenario
from rebalancer.clock import VirtualTime
from rebalancer.compute import AdapterError, ArmConfig, ComputeAdapter, ErrorKind
from rebalancer.compute.rest import COMPUTE_API_VERSION, SKU_API_VERSION
from rebalancer.model import ScaleSetRef
from tests.answering import Answer, Answering, answer_through
from tests.azurite import in_fresh_process

ROOT = Path(__file__).parent.parent
NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
SCENARIO = Scenario(
    scale_sets=(
        ScaleSetSpec("web", "rg-web", counts={"1": 2, "2": 2, "3": 2}),
        ScaleSetSpec("flex", "rg-flex", mode="Flexible", counts={"1": 2, "2": 2, "3": 2}),
    )
)

_FIRST_TICK = """\
import json, sys
import function_app
from armsim import ArmSim, ScaleSetSpec, Scenario
from devkit.host import Host
from devkit.stack import compute_for, settings_for
from rebalancer.clock import VirtualTime
from rebalancer.service import build_runtime
from rebalancer.store import StorageConnection, Store

connection_string, prefix = sys.argv[1:3]
enabled = {"zone-rebalance": "enabled"}
scenario = Scenario(
    scale_sets=(
        ScaleSetSpec("web", "rg-web", counts={"1": 2, "2": 2, "3": 2}, tags=enabled),
        ScaleSetSpec("flex", "rg-flex", mode="Flexible", counts={"1": 2, "2": 2, "3": 2},
                     tags=enabled),
    )
)
started = set(sys.modules)
with ArmSim.start(scenario) as sim:
    store = Store(StorageConnection("test", connection_string=connection_string),
                  table_prefix=prefix, retry_total=0)
    settings = settings_for(sim)
    compute = compute_for(sim, settings)
    runtime = build_runtime(settings, store=store, compute=compute, clock=VirtualTime(sim.clock))
    host = Host(runtime)
    before = set(sys.modules)
    host.timer()
    tick = sorted(name for name in set(sys.modules) - before if name.startswith("azure.mgmt"))
    http = sorted(
        name for name in set(sys.modules) - started
        if name.split(".")[0] in ("requests", "charset_normalizer")
    )
    assessed = sorted(
        name for name in ("web", "flex")
        if store.last_assessment(sim.scale_set("rg-" + name, name).id.lower()) is not None
    )
    ref = runtime.reconciler.compute.list_scale_sets(["rg-web"])[0].ref
    compute.set_capacity(ref, 6)
    written = "azure.mgmt.compute" in sys.modules
    compute.close()
    store.close()
print(json.dumps({"tick": tick, "http": http, "assessed": assessed, "written": written}))
"""


def test_a_first_audit_tick_reads_without_importing_the_compute_sdk(azurite, table_prefix):
    """A fresh worker's first timer tick audits both modes and imports no azure.mgmt module
    (the SDK's client comes with the first write), nor requests: every client sends through
    urllib3 (rebalancer.transport)."""
    result = in_fresh_process(_FIRST_TICK, azurite, table_prefix)
    assert result["assessed"] == ["flex", "web"]
    assert result["tick"] == []
    assert result["http"] == []  # nor requests, by building the runtime or sending
    assert result["written"] is True


def test_the_reads_send_the_api_versions_the_sdk_sends():
    """The JSON reads name the same api-versions as azure-mgmt-compute's requests, so the
    answers have the shape its models were generated from."""
    from azure.mgmt.compute.operations import _operations as sdk

    for build in (
        sdk.build_virtual_machine_scale_sets_list_all_request("sub"),
        sdk.build_virtual_machine_scale_sets_get_request("rg", "web", "sub"),
        sdk.build_virtual_machine_scale_set_vms_list_request("rg", "web", "sub"),
        sdk.build_virtual_machine_scale_set_vms_get_request("rg", "web", "0", "sub"),
        sdk.build_virtual_machines_list_request("rg", "sub"),
        sdk.build_virtual_machines_get_request("rg", "vm", "sub"),
        sdk.build_virtual_machine_scale_set_rolling_upgrades_get_latest_request("rg", "web", "sub"),
        sdk.build_usage_list_request("westeurope", "sub"),
    ):
        assert f"api-version={COMPUTE_API_VERSION}" in build.url, build.url
    assert f"api-version={SKU_API_VERSION}" in sdk.build_resource_skus_list_request("sub").url


def adapter_for(sim: ArmSim) -> ComputeAdapter:
    config = ArmConfig(sim.subscription_id, endpoint=sim.endpoint, ca_cert=sim.ca_cert_path)
    return ComputeAdapter(config, sim.credential, clock=VirtualTime(sim.clock))


@pytest.mark.integration
def test_the_inventory_reads_send_what_the_sdk_sent():
    """Path, api-version, $expand and $filter of each inventory read, as armsim got them."""
    with ArmSim.start(SCENARIO) as sim, adapter_for(sim) as adapter:
        web = ScaleSetRef(sim.subscription_id, "rg-web", "web")
        flex = ScaleSetRef(sim.subscription_id, "rg-flex", "flex")
        adapter.read_inventory(web, NOW)
        adapter.read_inventory(flex, NOW, to_act=False)
        sent = [(r.operation, dict(r.query)) for r in sim.requests]
    assert sent == [
        ("vmss.get", {"api-version": COMPUTE_API_VERSION}),
        ("vmss_vm.list", {"api-version": COMPUTE_API_VERSION, "$expand": "instanceView"}),
        ("vmss.get", {"api-version": COMPUTE_API_VERSION}),
        (
            "vm.list",
            {
                "api-version": COMPUTE_API_VERSION,
                "$filter": f"'virtualMachineScaleSet/id' eq '{flex.id}'",
                "$expand": "instanceView",
            },
        ),
    ]


@pytest.mark.integration
def test_every_page_is_read_and_parsed():
    with ArmSim.start(replace(SCENARIO, page_size=4)) as sim, adapter_for(sim) as adapter:
        for name, operation in (("web", "vmss_vm.list"), ("flex", "vm.list")):
            sim.clear_requests()
            inventory = adapter.read_inventory(
                ScaleSetRef(sim.subscription_id, f"rg-{name}", name), NOW, to_act=False
            )
            assert sorted(i.name for i in inventory.instances) == sorted(
                vm.name for vm in sim.scale_set(f"rg-{name}", name).vms
            )
            assert [r.operation for r in sim.requests].count(operation) == 2


# -- answers armsim does not give: a urllib3 pool under the product's transport -------------

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
WEB = ScaleSetRef(SUBSCRIPTION, "rg", "web")
VM_LIST = f"https://management.azure.com{WEB.id}/virtualMachines"


class Canned(Answering):
    """Answers every request with the next canned (status, body) and records the URLs."""

    def __init__(self, *answers: tuple[int, bytes]) -> None:
        super().__init__(self._next)
        self.answers = list(answers)
        self.sent: list[str] = []

    def _next(self, method: str, url: str, headers: Any, body: Any) -> Answer:
        self.sent.append(url)
        status, content = self.answers.pop(0)
        return status, {"content-type": "application/json"}, content


class _Token:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("canned", 4102444800)


class CannedAdapter(ComputeAdapter):
    def __init__(self, canned: Canned) -> None:
        super().__init__(ArmConfig(subscription_id=SUBSCRIPTION), _Token())
        self.canned = canned

    def _transport(self) -> Any:
        return answer_through(super()._transport(), self.canned)


def scale_set() -> Any:
    from rebalancer import arm

    return arm.parse_scale_set({"id": WEB.id, "location": "westus", "zones": ["1", "2"]})


def test_an_unreadable_answer_is_an_invalid_error_naming_the_read():
    canned = Canned((200, b'{"value": [{"instanceId": "0", '))
    with CannedAdapter(canned) as adapter, pytest.raises(AdapterError) as raised:
        adapter.read_inventory(WEB, NOW, scale_set=scale_set())
    assert raised.value.kind is ErrorKind.INVALID
    assert f"unreadable JSON in the answer to the VM list of {WEB}" in raised.value.message
    assert raised.value.ref == WEB


def test_a_next_link_to_another_host_is_refused_without_sending_the_token():
    page = {"value": [], "nextLink": "https://elsewhere.example/next?api-version=2026-04-01"}
    canned = Canned((200, json.dumps(page).encode()))
    with CannedAdapter(canned) as adapter, pytest.raises(AdapterError) as raised:
        adapter.read_inventory(WEB, NOW, scale_set=scale_set())
    assert raised.value.kind is ErrorKind.INVALID
    assert "refusing to send a token there" in raised.value.message
    assert canned.sent == [f"{VM_LIST}?api-version=2026-04-01&$expand=instanceView"]


def test_an_error_answer_keeps_its_classification():
    body = {"error": {"code": "AuthorizationFailed", "message": "The client 'x' does not have "
            "authorization to perform action 'Microsoft.Compute/virtualMachineScaleSets/"
            "virtualMachines/read' over scope '/x'."}}  # fmt: skip
    canned = Canned((403, json.dumps(body).encode()))
    with CannedAdapter(canned) as adapter, pytest.raises(AdapterError) as raised:
        adapter.read_inventory(WEB, NOW, scale_set=scale_set())
    assert raised.value.kind is ErrorKind.FORBIDDEN
    assert raised.value.missing_action == (
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read"
    )
