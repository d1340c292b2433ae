"""rebalancer.transport: azure-core's transport on urllib3, against real sockets (a loopback
HTTP server, armsim's TLS) - what the pipeline, the SDKs and the error classification rely on.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
from azure.core.exceptions import (
    IncompleteReadError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import HttpRequest as LegacyRequest
from azure.core.rest import HttpRequest

from armsim import ArmSim, Scenario
from rebalancer.compute.rest import COMPUTE_API_VERSION
from rebalancer.transport import Urllib3Transport, bypasses_proxy


def _scale_sets(sim: ArmSim) -> str:
    return (
        f"{sim.endpoint}/subscriptions/{sim.subscription_id}/providers/Microsoft.Compute"
        f"/virtualMachineScaleSets?api-version={COMPUTE_API_VERSION}"
    )


class Loopback(ThreadingHTTPServer):
    """An HTTP/1.1 server on 127.0.0.1 recording what it is sent and who sent it."""

    daemon_threads = True

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay = delay
        self.seen: list[dict[str, Any]] = []
        self.peers: set[int] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as ARM and Storage

    def _answer(self) -> None:
        server: Loopback = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        server.seen.append(
            {"method": self.command, "path": self.path, "headers": self.headers, "body": body}
        )
        server.peers.add(self.client_address[1])
        time.sleep(server.delay)
        if self.path.startswith("/gzip"):
            content = gzip.compress(b'{"zipped": true}')
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
        else:
            content = b'{"answer": "\xc3\xa9t\xc3\xa9"}'
            self.send_response(201)
            self.send_header("X-Ms-Request-Id", "abc")
            self.send_header("Retry-After", "7")
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_PUT = do_PATCH = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def loopback(delay: float = 0.0) -> Iterator[Loopback]:
    server = Loopback(delay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _transport(**kwargs: Any) -> Urllib3Transport:
    return Urllib3Transport(proxies=kwargs.pop("proxies", {}), **kwargs)


def test_status_headers_and_body_round_trip():
    with loopback() as server, _transport() as transport:
        request = HttpRequest("PUT", f"{server.url}/things?x=1", content=b'{"a": 1}')
        request.headers["If-Match"] = '"4"'
        response = transport.send(request)
    assert response.status_code == 201 and response.reason == "Created"
    assert response.headers["x-ms-request-id"] == response.headers["X-MS-REQUEST-ID"] == "abc"
    assert response.headers.get("retry-after") == "7"
    assert response.content_type == "application/json; charset=utf-8"
    assert response.json() == {"answer": "été"} and response.text() == '{"answer": "été"}'
    assert isinstance(response.internal_response, urllib3.HTTPResponse)
    sent = server.seen[0]
    assert (sent["method"], sent["path"], sent["body"]) == ("PUT", "/things?x=1", b'{"a": 1}')
    assert sent["headers"]["If-Match"] == '"4"'
    assert sent["headers"]["Accept-Encoding"] == "gzip, deflate"


def test_legacy_requests_get_legacy_responses_with_a_body_and_text():
    """Some clients still send azure-core's legacy HttpRequest (body(), text())."""
    with loopback() as server, _transport() as transport:
        request = LegacyRequest("POST", f"{server.url}/token")
        request.headers["Content-Type"] = "application/x-www-form-urlencoded"
        request.set_formdata_body({"resource": "https://management.azure.com/", "x": "a b"})
        response = transport.send(request)
        multipart = LegacyRequest("POST", f"{server.url}/form")
        multipart.set_formdata_body({"field": "value"})
        transport.send(multipart)
    assert response.status_code == 201 and response.headers["X-MS-Request-ID"] == "abc"
    assert response.body() == '{"answer": "été"}'.encode()
    assert response.text() == '{"answer": "été"}'
    sent = server.seen[0]
    assert sent["body"] == b"resource=https%3A%2F%2Fmanagement.azure.com%2F&x=a+b"
    assert sent["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    form = server.seen[1]
    assert form["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="field"' in form["body"] and b"value" in form["body"]


def test_a_streamed_body_is_read_in_blocks_and_decompressed():
    with loopback() as server, _transport(data_block_size=4) as transport:
        response = transport.send(HttpRequest("GET", f"{server.url}/gzip"), stream=True)
        assert not response.is_stream_consumed
        chunks = list(response.iter_bytes())
        legacy = transport.send(LegacyRequest("GET", f"{server.url}/gzip"), stream=True)
        streamed = b"".join(legacy.stream_download(None))
    assert b"".join(chunks) == streamed == b'{"zipped": true}' and len(chunks) > 1


def test_a_refused_connection_is_a_service_request_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with _transport() as transport, pytest.raises(ServiceRequestError) as raised:
        transport.send(HttpRequest("GET", f"http://127.0.0.1:{port}/"))
    assert "refused" in str(raised.value).lower()


def test_a_read_timeout_is_a_service_response_error():
    with loopback(delay=1.0) as server, _transport(read_timeout=0.2) as transport:
        with pytest.raises(ServiceResponseError) as raised:
            transport.send(HttpRequest("GET", f"{server.url}/slow"))
        started = time.monotonic()
        with pytest.raises(ServiceResponseError):
            transport.send(HttpRequest("GET", f"{server.url}/slow"), read_timeout=0.1)
    assert "timed out" in str(raised.value).lower()
    assert time.monotonic() - started < 0.9


def test_a_body_cut_short_is_an_incomplete_read_as_requests_raised_it():
    """A server that closes before the Content-Length it announced: azure-core's
    IncompleteReadError, as its requests transport raised it, not a short body."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    try:
        with _transport() as transport, pytest.raises(IncompleteReadError) as raised:
            transport.send(HttpRequest("GET", url))
    finally:
        thread.join(5)
        listener.close()
    assert "IncompleteRead" in str(raised.value)


def test_the_server_is_verified_against_the_ca_bundle():
    """armsim's certificate is issued by its own CA: verified with that bundle, refused with
    certifi's (as Azure's would be against a wrong bundle)."""
    with ArmSim.start(Scenario()) as sim:
        url = _scale_sets(sim)
        with _transport(ca_bundle=sim.ca_cert_path) as transport:
            assert transport.send(HttpRequest("GET", url)).status_code == 401  # no token
        with _transport() as transport, pytest.raises(ServiceRequestError) as raised:
            transport.send(HttpRequest("GET", url))
    message = str(raised.value)
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert "not trusted by the CA bundle" in message and "REQUESTS_CA_BUNDLE" in message


def _counted_loads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The bundles loaded into TLS contexts from now on, one entry per load."""
    loads: list[Any] = []
    original = ssl.SSLContext.load_verify_locations

    def counted(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> Any:
        loads.append(args[:1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    return loads


def test_the_ca_bundle_is_loaded_once_per_transport_not_per_connection(monkeypatch):
    with ArmSim.start(Scenario(), latency=0.05) as sim:
        url = _scale_sets(sim)
        loads = _counted_loads(monkeypatch)
        with _transport(ca_bundle=sim.ca_cert_path) as transport, ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: transport.send(HttpRequest("GET", url)), range(12)))
    assert [r.status_code for r in statuses] == [401] * 12
    assert loads == [(sim.ca_cert_path,)]


def test_every_client_with_one_bundle_shares_one_context_loaded_once(monkeypatch, tmp_path):
    """Compute, Table Storage and the follow-up queue each have a transport: a new worker
    parses the bundle once for all of them; another bundle gets a context of its own."""
    with ArmSim.start(Scenario()) as sim:
        url = _scale_sets(sim)
        other = tmp_path / "copy-of-armsim-ca.pem"
        other.write_bytes(Path(sim.ca_cert_path).read_bytes())
        loads = _counted_loads(monkeypatch)
        clients = [_transport(ca_bundle=sim.ca_cert_path) for _ in range(3)]
        clients.append(_transport(ca_bundle=str(other)))
        for client in clients:
            with client:
                assert client.send(HttpRequest("GET", url)).status_code == 401
    assert loads == [(sim.ca_cert_path,), (str(other),)]


def test_an_http_only_client_never_loads_a_bundle(monkeypatch):
    """Azurite over http:// pays no CA bundle load."""
    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", None)  # would raise if called
    with loopback() as server, _transport() as transport:
        assert transport.send(HttpRequest("GET", server.url)).status_code == 201


def test_requests_to_more_hosts_than_the_manager_keeps_pools_for_all_arrive():
    """More hosts than urllib3's manager keeps pools for (10): each is reached again on its
    own pool. A URL without a path and one with a fragment are sent as urllib3 sends them."""
    servers = [Loopback() for _ in range(12)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        with _transport() as transport:
            for _ in range(2):
                for server in servers:
                    assert (
                        transport.send(HttpRequest("GET", f"{server.url}/a?b=c")).status_code == 201
                    )
            transport.send(HttpRequest("GET", f"{servers[0].url}?only=query"))
            transport.send(HttpRequest("GET", f"{servers[0].url}/frag#part"))
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert [[seen["path"] for seen in s.seen] for s in servers[1:]] == [["/a?b=c"] * 2] * 11
    assert [seen["path"] for seen in servers[0].seen] == [
        "/a?b=c",
        "/a?b=c",
        "/?only=query",
        "/frag",
    ]


def test_the_pool_keeps_as_many_connections_per_host_as_asked():
    """Twelve requests at once, twice: a pool of 12 answers the second wave on the first
    wave's connections; a pool of 2 keeps 2 and opens the others again."""

    def waves(pool: int) -> tuple[int, int]:
        with loopback(delay=0.2) as server, _transport(pool=pool) as transport:
            counts = []
            send = lambda _: transport.send(HttpRequest("GET", server.url))  # noqa: E731
            for _ in range(2):
                with ThreadPoolExecutor(12) as threads:
                    list(threads.map(send, range(12)))
                counts.append(len(server.peers))
        return counts[0], counts[1]

    assert waves(12) == (12, 12)
    first, second = waves(2)
    assert first == 12 and second > 12


def test_proxies_come_from_the_environment_once_and_no_proxy_means_direct(monkeypatch):
    with loopback() as target, loopback() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("http_proxy", raising=False)
        proxied = Urllib3Transport()
        monkeypatch.setenv("NO_PROXY", "example.invalid,127.0.0.1")
        direct = Urllib3Transport()
        monkeypatch.delenv("HTTP_PROXY")  # read at construction, not per request
        with proxied, direct:
            proxied.send(HttpRequest("GET", f"{target.url}/via-proxy"))
            direct.send(HttpRequest("GET", f"{target.url}/direct"))
    assert [s["path"] for s in proxy.seen] == [f"{target.url}/via-proxy"]  # absolute form
    assert [s["path"] for s in target.seen] == ["/direct"]
    assert proxied.proxy_for(target.url) == proxy.url and direct.proxy_for(target.url) is None


@pytest.mark.parametrize(
    ("netloc", "no_proxy", "direct"),
    [
        ("10.1.2.3", "10.0.0.0/8", True),  # requests read CIDR ranges; urllib does not
        ("10.1.2.3:8443", "example.invalid, 10.0.0.0/8", True),
        ("11.1.2.3", "10.0.0.0/8", False),
        ("169.254.169.254", "169.254.0.0/16", True),  # the instance metadata endpoint
        ("[fd00::5]:443", "fd00::/8", True),
        ("[fe80::1]", "fd00::/8", False),
        ("10.1.2.3", "10.1.2.3", True),  # a plain address, as urllib reads it
        ("management.azure.com", "10.0.0.0/8", False),  # a name is never in a range
        ("management.azure.com", ".azure.com", True),  # a domain suffix
        ("account.table.core.windows.net", "core.windows.net", True),
        ("management.azure.com", "*", True),
        ("10.1.2.3", "10.0.0.0/33,not/a/range,", False),  # what is not a range is no match
        ("10.1.2.3", "", False),
    ],
)
def test_no_proxy_reads_names_suffixes_and_cidr_ranges(netloc, no_proxy, direct):
    assert bypasses_proxy(netloc, {"https": "http://proxy.invalid:3128", "no": no_proxy}) is direct


def test_a_cidr_range_in_no_proxy_sends_straight_to_the_host(monkeypatch):
    with loopback() as target, loopback() as proxy:
        for name in ("http_proxy", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "10.0.0.0/8, 127.0.0.0/8")
        with Urllib3Transport() as transport:
            transport.send(HttpRequest("GET", f"{target.url}/direct"))
    assert proxy.seen == [] and [s["path"] for s in target.seen] == ["/direct"]


class _AppServiceIdentity(BaseHTTPRequestHandler):
    """The App Service / Functions identity endpoint (IDENTITY_ENDPOINT, api-version
    2019-08-01): a token for the resource asked, if the X-IDENTITY-HEADER matches."""

    def do_GET(self) -> None:
        assert self.headers["X-IDENTITY-HEADER"] == "secret"
        body = json.dumps(
            {
                "access_token": "from-the-identity-endpoint",
                "expires_on": str(int(time.time()) + 3600),
                "resource": "https://storage.azure.com",
                "token_type": "Bearer",
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_the_managed_identity_gets_its_token_through_this_transport(monkeypatch):
    """The deployed app's credential (a managed identity, App Service style as in Functions)
    sends through this transport too: one HTTP stack, one reading of the proxy settings."""
    from rebalancer.store import parse_connection, storage_credential

    sent: list[str] = []
    original = Urllib3Transport.send

    def send(self: Urllib3Transport, request: Any, **kwargs: Any) -> Any:
        sent.append(request.url)
        return original(self, request, **kwargs)

    monkeypatch.setattr(Urllib3Transport, "send", send)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AppServiceIdentity)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/msi/token"
    monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", "secret")
    connection = parse_connection(
        {
            "AzureWebJobsStorage__accountName": "acct",
            "AzureWebJobsStorage__credential": "managedidentity",
        }
    )
    try:
        token = storage_credential(connection).get_token("https://storage.azure.com/.default")
    finally:
        server.shutdown()
        server.server_close()
    assert token.token == "from-the-identity-endpoint"
    assert [url.split("?")[0] for url in sent] == [endpoint]
