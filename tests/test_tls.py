"""The app's connections share one TLS context per CA bundle (rebalancer.transport): the
bundle is loaded once, not once per connection, which a worker's first audit paid once per
thread (docs/performance.md, figure 4); the server is still verified against it, Table
Storage over HTTPS too, and a certificate the bundle does not trust is named as such."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from typing import Any

import pytest

from armsim import ArmSim, ScaleSetSpec, Scenario
from rebalancer.clock import VirtualTime
from rebalancer.compute import AdapterError, ArmConfig, ComputeAdapter
from rebalancer.model import OutsideChange

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
SCENARIO = Scenario(
    scale_sets=tuple(
        ScaleSetSpec(f"web{i}", "rg-web", counts={"1": 1, "2": 1, "3": 1}) for i in range(6)
    )
)


def _counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Any]:
    calls: list[Any] = []
    original = getattr(ssl.SSLContext, name)

    def counted(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> Any:
        calls.append(args[:1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, name, counted)
    return calls


def _audit(sim: ArmSim, ca_cert: str | None) -> list[Any]:
    config = ArmConfig(
        sim.subscription_id, endpoint=sim.endpoint, ca_cert=ca_cert, audit_concurrency=6
    )
    with ComputeAdapter(config, sim.credential, clock=VirtualTime(sim.clock)) as adapter:
        return adapter.read_inventories(adapter.list_scale_sets(["rg-web"]), NOW)


@pytest.mark.integration
def test_the_audit_threads_load_the_ca_bundle_once(monkeypatch):
    with ArmSim.start(SCENARIO, latency=0.05) as sim:
        loads = _counted(monkeypatch, "load_verify_locations")
        connections = _counted(monkeypatch, "wrap_socket")
        inventories = _audit(sim, sim.ca_cert_path)
    assert [type(i).__name__ for i in inventories] == ["Inventory"] * 6
    assert len(connections) > 2  # the threads read at once, each on its own connection
    assert loads == [(sim.ca_cert_path,)]


@pytest.mark.integration
def test_the_shared_context_still_verifies_the_server():
    """Without armsim's CA (requests' default bundle), its certificate is refused."""
    with ArmSim.start(SCENARIO) as sim:
        config = ArmConfig(sim.subscription_id, endpoint=sim.endpoint)
        adapter = ComputeAdapter(config, sim.credential, clock=VirtualTime(sim.clock))
        with adapter, pytest.raises(AdapterError) as raised:
            adapter.list_scale_sets(["rg-web"])
    assert "CERTIFICATE_VERIFY_FAILED" in str(raised.value)


@pytest.mark.integration
def test_a_bundle_from_the_environment_is_still_honoured(monkeypatch):
    """REQUESTS_CA_BUNDLE replaces requests' default bundle: the adapter reads it once and the
    shared context loads that bundle, and nothing else."""
    with ArmSim.start(SCENARIO) as sim:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", sim.ca_cert_path)
        loads = _counted(monkeypatch, "load_verify_locations")
        inventories = _audit(sim, None)
    assert [type(i).__name__ for i in inventories] == ["Inventory"] * 6
    assert loads and set(loads) == {(sim.ca_cert_path,)}


@pytest.mark.integration
def test_table_storage_over_https_is_trusted_through_the_environments_bundle(monkeypatch, tmp_path):
    """As in Azure, Table Storage over TLS: with its CA in REQUESTS_CA_BUNDLE the store reads
    and writes; without it, the error names the bundle and what to set, and nothing is lost
    (the store raises `StoreUnavailable`, which the host redelivers)."""
    from bench.cold_start import azure_sized_bundle, storage_certificate
    from devkit.azurite import Azurite
    from rebalancer.store import StorageConnection, Store, StoreUnavailable

    served, storage_ca = storage_certificate(tmp_path)
    bundle = azure_sized_bundle((storage_ca,), tmp_path)
    with Azurite(tls=served) as azurite:
        assert azurite.connection_string.startswith("DefaultEndpointsProtocol=https;")
        connection = StorageConnection(
            "AzureWebJobsStorage", connection_string=azurite.connection_string
        )
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
        trusted = Store(connection, table_prefix="tls", retry_total=0)
        trusted.record_activity("sub/rg/web", NOW, OutsideChange.CAPACITY_WRITE)
        assert trusted.outside_activity("sub/rg/web").capacity_written_at == NOW
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        untrusted = Store(connection, table_prefix="tls", retry_total=0)
        with pytest.raises(StoreUnavailable) as raised:
            untrusted.outside_activity("sub/rg/web")
        trusted.close()
        untrusted.close()
    message = str(raised.value)
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert "not trusted by the CA bundle" in message and "REQUESTS_CA_BUNDLE" in message
