"""HTTPS on loopback: a threading HTTP/1.1 server with keep-alive and a generated certificate."""

from __future__ import annotations

import contextlib
import http.server
import logging
import socket
import ssl
import struct
import threading
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from armsim.api import Reply, Request
from armsim.errors import ArmError

if TYPE_CHECKING:
    from armsim.api import Api

log = logging.getLogger(__name__)
MAX_BODY = 4 * 1024 * 1024


def make_certificates(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A fresh CA and a server certificate for 127.0.0.1/localhost; returns (context, CA path)."""
    import trustme

    authority = trustme.CA()
    server_cert = authority.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    ca_path = directory / "armsim-ca.pem"
    authority.cert_pem.write_to_path(str(ca_path))
    return context, ca_path


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "armsim"
    sys_version = ""
    timeout = 30
    server: SimHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.address_string(), *args)

    def _serve(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._send(
                Reply(413, ArmError(413, "RequestEntityTooLarge", "Body too large.").to_json())
            )
            return
        body = self.rfile.read(length) if length else b""
        request = Request(
            method=self.command,
            path=urllib.parse.unquote(parsed.path),
            query=query,
            headers={key.lower(): value for key, value in self.headers.items()},
            body=body,
            base_url=self.server.base_url,
            client_ip=self.client_address[0],
        )
        try:
            reply = self.server.api.handle(request)
        except Exception:
            log.exception("armsim failed on %s %s", self.command, self.path)
            reply = Reply(
                500,
                ArmError(
                    500,
                    "InternalServerError",
                    "armsim hit an unexpected error; see its log for the traceback.",
                ).to_json(),
            )
        if reply.reset:
            self._reset()
            return
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        payload = reply.payload()
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if payload:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        # Headers and body in one write: two small writes meet Nagle and delayed ACKs (40 ms).
        self._headers_buffer.append(b"\r\n")
        if payload:
            self._headers_buffer.append(payload)
        self.flush_headers()

    def _reset(self) -> None:
        """Drop the connection with a TCP RST, as a failing front end would."""
        self.close_connection = True
        try:
            raw = self.connection
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
        except OSError:
            pass

    do_GET = _serve
    do_PUT = _serve
    do_PATCH = _serve
    do_POST = _serve
    do_DELETE = _serve


class SimHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, host: str, port: int, api: Api, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__((host, port), _Handler)
        self.api = api
        self.ssl_context = ssl_context
        scheme = "https" if ssl_context else "http"
        self.base_url = f"{scheme}://{host}:{self.server_address[1]}"
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Runs on the connection's own thread: the TLS handshake too, so accept never blocks."""
        with self._connections_lock:
            self._connections.add(request)
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                request.settimeout(30)
                try:
                    request = self.ssl_context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as error:
                    log.debug("TLS handshake with %s failed: %s", client_address, error)
                    return
            self.RequestHandlerClass(request, client_address, self)
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError) as error:
            log.debug("connection from %s ended: %s", client_address, error)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
            self._connections.clear()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
