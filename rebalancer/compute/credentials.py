"""A fixed bearer token, for talking to a simulator (armsim) on this machine only.

`DefaultAzureCredential` cannot log in where there is no Azure; armsim accepts any token. To
keep a static token from ever being sent to a real endpoint, it is refused for anything but a
loopback host.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import AccessToken

LOOPBACK_HOSTS = frozenset(("127.0.0.1", "localhost", "::1"))


class StaticTokenCredential:
    def __init__(self, token: str, endpoint: str) -> None:
        host = urlsplit(endpoint).hostname or ""
        if host not in LOOPBACK_HOSTS:
            raise ValueError(
                f"a static token is only allowed for a loopback endpoint (127.0.0.1, localhost), "
                f"not {endpoint!r}; use a real Azure login for Azure"
            )
        if not token:
            raise ValueError("the static token is empty")
        self._token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + 3600)

    def close(self) -> None:
        return None
