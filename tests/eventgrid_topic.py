"""A loopback Event Grid topic for tests: HTTPS (trustme) on 127.0.0.1, a free port.

It speaks the publish API of a basic topic with the CloudEvents 1.0 input schema:
`POST /api/events?api-version=...` with an `application/cloudevents-batch+json` body and an
Entra ID bearer token, answering 200 with an empty body (or the statuses a test queues).
A test module wraps `make_tls` and `running_topic` in its own fixtures.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import trustme

TOKEN = "test-token-for-loopback"


@dataclass
class Received:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: object


@dataclass
class Receiver:
    """A loopback Event Grid topic. `statuses`: what to answer, in turn (then 200)."""

    endpoint: str
    ca_path: str
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


Tls = tuple[ssl.SSLContext, str]
"""The server's TLS context and the path of the CA certificate a client must trust."""


def make_tls(directory: Path) -> Tls:
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_path = directory / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_path))
    return context, str(ca_path)


@contextmanager
def running_topic(tls: Tls) -> Iterator[Receiver]:
    """Serve until the block ends; `receiver.endpoint` is the topic endpoint."""
    context, ca_path = tls
    state = Receiver(endpoint="", ca_path=ca_path)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            url = urlsplit(self.path)
            with lock:
                state.received.append(
                    Received(
                        url.path,
                        parse_qs(url.query),
                        {k.lower(): v for k, v in self.headers.items()},
                        json.loads(raw or b"null"),
                    )
                )
                status = state.statuses.pop(0) if state.statuses else 200
            body = b"" if status == 200 else b'{"error":{"code":"InternalServerError"}}'
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    state.endpoint = f"https://127.0.0.1:{server.server_address[1]}/api/events"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def notifier_for(endpoint: str, ca_path: str, **options: object):
    """An EventGridNotifier for the loopback topic; waits between attempts are only noted."""
    from rebalancer.compute.credentials import StaticTokenCredential
    from rebalancer.notify import EventGridNotifier

    sleeps: list[float] = []
    defaults: dict[str, object] = {
        "credential": StaticTokenCredential(TOKEN, endpoint),
        "client_options": {"connection_verify": ca_path},
        "timeout": 5.0,
        "sleep": sleeps.append,
    }
    defaults.update(options)
    return EventGridNotifier(endpoint, **defaults)  # type: ignore[arg-type]
