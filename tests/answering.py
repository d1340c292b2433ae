"""Answers a test gives in place of a server, at the product transport's urllib3 seam.

`Answering` is the `urllib3.PoolManager` a `rebalancer.transport.Urllib3Transport` sends
through (with the per-origin pools it hands the transport); everything above it (azure-core's
pipeline, the retry policy and budget, the transport's request and response handling, the
parsing) is the product's own. Only the socket is replaced: each request is answered with a
`urllib3.HTTPResponse` built as urllib3 builds one from the wire (body read from a stream,
decoded by content-encoding, length enforced).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import urllib3

from rebalancer.transport import Urllib3Transport

Answer = tuple[int, Mapping[str, str], bytes]
"""Status, headers and body of one answer."""


class Answering(urllib3.PoolManager):
    """Answers each request with `answer(method, url, headers, body)`."""

    def __init__(self, answer: Callable[[str, str, Mapping[str, str], Any], Answer]) -> None:
        super().__init__()
        self.answer = answer

    def connection_from_url(self, url: str, pool_kwargs: Any = None) -> Any:
        """The "pool" of one origin: requests to it are answered here too."""
        return _OriginPool(self, url.rstrip("/"))

    def urlopen(self, method: str, url: str, redirect: bool = True, **kw: Any) -> Any:
        status, headers, body = self.answer(method, url, kw.get("headers") or {}, kw.get("body"))
        headers = {"content-length": str(len(body)), **headers}
        return urllib3.HTTPResponse(
            body=io.BytesIO(body),
            headers=headers,
            status=status,
            reason="OK" if status < 400 else "Error",
            preload_content=kw.get("preload_content", True),
            request_method=method,
            request_url=url,
            enforce_content_length=True,
        )


class _OriginPool:
    """What `Answering.connection_from_url` gives: urllib3's pool interface (a request
    target on one origin), answered by the manager with the whole URL."""

    def __init__(self, manager: Answering, origin: str) -> None:
        self.manager, self.origin = manager, origin

    def urlopen(self, method: str, url: str, assert_same_host: bool = True, **kw: Any) -> Any:
        return self.manager.urlopen(method, self.origin + url, **kw)


def answer_through(transport: Urllib3Transport, pool: Answering) -> Urllib3Transport:
    """`transport` sending every request to `pool` instead of the network."""
    transport._new_manager = lambda *args: pool  # type: ignore[method-assign]
    return transport
