"""Credentials the app builds itself.

`DeferredCredential`: the one `DefaultAzureCredential` Compute and Event Grid share when Table
Storage authenticates as another identity (or with a connection string).

`StaticTokenCredential`: a fixed bearer token, for talking to a simulator (armsim) on this
machine only. `DefaultAzureCredential` cannot log in where there is no Azure; armsim accepts
any token. To keep a static token from ever being sent to a real endpoint, it is refused for
anything but a loopback host.
"""

from __future__ import annotations

import threading
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


class DeferredCredential:
    """`DefaultAzureCredential`, built on the first token request and then shared: Compute and
    Event Grid hold one credential (one token cache, one client of the identity endpoint),
    and azure.identity is imported only when a call first needs a token."""

    def __init__(self, authority: str | None = None) -> None:
        self.authority = authority
        self._credential: Any = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._credential is not None

    def _get(self) -> Any:
        with self._lock:
            if self._credential is None:
                from azure.identity import DefaultAzureCredential

                kwargs = {"authority": self.authority} if self.authority else {}
                self._credential = DefaultAzureCredential(**kwargs)
            return self._credential

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return self._get().get_token(*scopes, **kwargs)

    def close(self) -> None:
        with self._lock:
            credential, self._credential = self._credential, None
        if credential is not None:
            credential.close()
