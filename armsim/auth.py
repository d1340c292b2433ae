"""Bearer tokens for armsim: unsigned JWTs that carry the caller's object id.

ARM reads the caller from the token; armsim does the same so each Event Grid event can name
who made the change (`claims[...objectidentifier]`). `SimCredential` is an azure-core
TokenCredential; give each client its own `object_id` to tell the app from outside actors.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from armsim.events import OBJECT_ID_CLAIM, TENANT_ID_CLAIM

if TYPE_CHECKING:  # imported with the first token: a cold start measured on armsim pays for it
    from azure.core.credentials import AccessToken, AccessTokenInfo

ARM_AUDIENCE = "https://management.core.windows.net/"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_token(object_id: str, tenant_id: str, app_id: str | None = None, ttl: int = 3600) -> str:
    now = int(time.time())
    claims = {
        "aud": ARM_AUDIENCE,
        "iss": f"https://sts.windows.net/{tenant_id}/",
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "appid": app_id or object_id,
        "appidacr": "2",
        "idtyp": "app",
        "oid": object_id,
        "tid": tenant_id,
        "ver": "1.0",
    }
    header = {"alg": "none", "typ": "JWT"}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.sim"


def claims_from_token(token: str) -> dict[str, str] | None:
    """The claims of a JWT-shaped token as Event Grid lists them, or None if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        raw: Mapping[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, json.JSONDecodeError):
        return None
    if not isinstance(raw, Mapping):
        return None
    claims = {key: str(value) for key, value in raw.items() if key not in ("oid", "tid") and value}
    if raw.get("oid"):
        claims[OBJECT_ID_CLAIM] = str(raw["oid"])
    if raw.get("tid"):
        claims[TENANT_ID_CLAIM] = str(raw["tid"])
    return claims


class SimCredential:
    """A TokenCredential whose tokens name `object_id` as the caller."""

    def __init__(self, object_id: str, tenant_id: str, app_id: str | None = None) -> None:
        self.object_id = object_id
        self.tenant_id = tenant_id
        self.app_id = app_id

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        from azure.core.credentials import AccessToken

        token = make_token(self.object_id, self.tenant_id, self.app_id)
        return AccessToken(token, int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        from azure.core.credentials import AccessTokenInfo

        token = make_token(self.object_id, self.tenant_id, self.app_id)
        return AccessTokenInfo(token, int(time.time()) + 3600)

    def close(self) -> None:
        return None

    def __enter__(self) -> SimCredential:
        return self

    def __exit__(self, *args: object) -> None:
        return None
