"""One TLS context for every connection of the Compute adapter's transport.

requests hands urllib3 the CA bundle's path with each connection, and urllib3 loads the bundle
into a new context for each connection it opens. In Azure the bundle is certifi's (about 140
certificates, which management.azure.com is verified against): 10-25 ms of CPU a load on the
benchmark's machine, paid once per audit thread on a worker's first tick. This adapter loads
the bundle once, into a context with urllib3's own defaults (certificate required, host name
checked), and hands that context to every connection of its pools.
"""

from __future__ import annotations

from typing import Any

import requests
from urllib3.util.ssl_ import create_urllib3_context


class SharedTlsAdapter(requests.adapters.HTTPAdapter):
    """requests' HTTPAdapter whose pools share one TLS context holding `ca_bundle` (None:
    requests' default bundle). A request that verifies against anything else (another bundle
    from REQUESTS_CA_BUNDLE, or no verification) gets urllib3's own context per connection,
    as without this adapter: the shared context is never changed by a request."""

    def __init__(self, ca_bundle: str | None = None, **kwargs: Any) -> None:
        self.ca_bundle = ca_bundle
        super().__init__(**kwargs)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        self.context = create_urllib3_context()  # certificate required, host name checked
        self.context.load_verify_locations(self.ca_bundle or requests.certs.where())
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
            conn.ca_certs = None  # already in the shared context: not loaded per connection
        else:
            del conn_kw["ssl_context"]  # this pool verifies otherwise: its own contexts
