"""One TLS context for every connection of a transport (the Compute adapter's, Table
Storage's).

requests hands urllib3 the CA bundle's path with each connection, and urllib3 loads the bundle
into a new context for each connection it opens. In Azure the bundle is certifi's (about 140
certificates, which management.azure.com and Table Storage are verified against): 10-25 ms of
CPU a load on the benchmark's machine, paid once per audit thread and per client on a worker's
first tick. This adapter loads the bundle once, into a context with urllib3's own defaults
(certificate required, host name checked), and hands that context to every connection of its
pools.
"""

from __future__ import annotations

import threading
from typing import Any

import requests
from urllib3.util.retry import Retry
from urllib3.util.ssl_ import create_urllib3_context

NO_RETRIES = Retry(total=False, redirect=False, raise_on_status=False)
"""urllib3's own retries off: the pipeline's retry policy retries (azure-core's setting)."""


class SharedTlsAdapter(requests.adapters.HTTPAdapter):
    """requests' HTTPAdapter whose pools share one TLS context holding `ca_bundle` (None:
    requests' default bundle), loaded with the first HTTPS request (a client that only speaks
    HTTP, to Azurite, never loads it). A request that verifies against anything else (another
    bundle from REQUESTS_CA_BUNDLE, or no verification) gets urllib3's own context per
    connection, as without this adapter: the shared context is never changed by a request."""

    def __init__(self, ca_bundle: str | None = None, **kwargs: Any) -> None:
        self.ca_bundle = ca_bundle
        self._loading = threading.Lock()
        self._loaded = False
        super().__init__(**kwargs)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        self.context = create_urllib3_context()  # certificate required, host name checked
        self._loaded = False
        super().init_poolmanager(
            connections, maxsize, block, ssl_context=self.context, **pool_kwargs
        )

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)
        conn_kw = getattr(conn, "conn_kw", {})
        if conn_kw.get("ssl_context") is not self.context:
            return  # a plain-HTTP or proxy pool
        same = verify is True if self.ca_bundle is None else verify == self.ca_bundle
        if same and not cert:
            if not self._loaded:
                with self._loading:  # before this pool's first connection uses the context
                    if not self._loaded:
                        bundle = self.ca_bundle or requests.certs.where()
                        self.context.load_verify_locations(bundle)
                        self._loaded = True
            conn.ca_certs = None  # already in the shared context: not loaded per connection
        else:
            del conn_kw["ssl_context"]  # this pool verifies otherwise: its own contexts


def shared_tls_session(ca_bundle: str | None = None, pool: int = 10) -> requests.Session:
    """A requests session for azure-core's RequestsTransport whose HTTPS connections share one
    TLS context: `pool` connections kept per host, urllib3's own retries off (the pipeline's
    retry policy retries), as azure-core mounts the adapters of the sessions it makes."""
    session = requests.Session()
    session.mount(
        "https://",
        SharedTlsAdapter(
            ca_bundle, pool_connections=pool, pool_maxsize=pool, max_retries=NO_RETRIES
        ),
    )
    return session
