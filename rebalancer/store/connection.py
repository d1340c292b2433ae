"""Where the tables are and how to authenticate: `AzureWebJobsStorage`-style app settings ->
`StorageConnection`, its credential, and the azure-data-tables service client."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rebalancer.store.errors import StoreConfigError


@dataclass(frozen=True, slots=True)
class StorageConnection:
    """Where the tables are and how to authenticate, from `AzureWebJobsStorage`-style settings.

    Either a connection string (`UseDevelopmentStorage=true` for Azurite on its default port),
    or an identity-based table service URI with a managed identity (or, without
    `__credential`, `DefaultAzureCredential`, which also picks up a developer's `az login`).
    """

    setting: str
    connection_string: str | None = None
    table_service_uri: str | None = None
    managed_identity: bool = False
    client_id: str | None = None

    @property
    def identity_based(self) -> bool:
        return self.table_service_uri is not None

    def __repr__(self) -> str:  # never print account keys or SAS tokens
        kind = (
            f"identity-based {self.table_service_uri}"
            if self.identity_based
            else "connection string"
        )
        return f"StorageConnection({self.setting}: {kind})"


def _setting(env: Mapping[str, str], name: str) -> str | None:
    """Exact name first, then case-insensitively (App Service keeps the case it was given)."""
    value = env.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in env.items() if k.lower() == lowered), None)
    value = (value or "").strip()
    return value or None


def _sub_setting(env: Mapping[str, str], name: str, suffix: str) -> str | None:
    return _setting(env, f"{name}__{suffix}") or _setting(env, f"{name}:{suffix}")


def parse_connection(
    env: Mapping[str, str], name: str = "AzureWebJobsStorage"
) -> StorageConnection:
    """Read the storage connection named `name` from app settings (pure; no network).

    Forms, as the Functions host understands them:
    - `name` = a connection string, or `UseDevelopmentStorage=true`;
    - `name__tableServiceUri` = `https://<account>.table.core.windows.net` (identity-based),
      or `name__accountName` = `<account>` (the public-cloud URI is derived);
      optional `name__credential` = `managedidentity` and `name__clientId` (user-assigned).
    """
    connection_string = _setting(env, name)
    if connection_string:
        if "=" not in connection_string:
            raise StoreConfigError(
                f"{name} is not a storage connection string (expected 'Key=Value;...' or "
                f"UseDevelopmentStorage=true); for an identity-based connection remove it and "
                f"set {name}__tableServiceUri"
            )
        return StorageConnection(name, connection_string=connection_string)
    uri = _sub_setting(env, name, "tableServiceUri")
    account = _sub_setting(env, name, "accountName")
    if uri is None and account is not None:
        if not re.fullmatch(r"[a-z0-9]{3,24}", account):
            raise StoreConfigError(
                f"{name}__accountName={account!r} is not a storage account name "
                f"(3-24 lower-case letters and digits)"
            )
        uri = f"https://{account}.table.core.windows.net"
    if uri is None:
        raise StoreConfigError(
            f"no storage connection: set {name} to a connection string "
            f"(UseDevelopmentStorage=true locally), or {name}__tableServiceUri to "
            f"https://<account>.table.core.windows.net for an identity-based connection"
        )
    if not uri.lower().startswith("https://"):
        raise StoreConfigError(
            f"{name}__tableServiceUri={uri!r} must start with https:// "
            f"(token credentials are only sent over TLS)"
        )
    credential = _sub_setting(env, name, "credential")
    if credential is not None and credential.lower() != "managedidentity":
        raise StoreConfigError(
            f"{name}__credential={credential!r} is not supported: use 'managedidentity', "
            f"or leave it unset to use DefaultAzureCredential"
        )
    return StorageConnection(
        name,
        table_service_uri=uri.rstrip("/"),
        managed_identity=credential is not None,
        client_id=_sub_setting(env, name, "clientId"),
    )


def storage_credential(connection: StorageConnection) -> Any:
    """The token credential an identity-based connection authenticates with (None for a
    connection string): the managed identity it names, or DefaultAzureCredential."""
    if not connection.identity_based:
        return None
    if connection.managed_identity:
        from azure.identity import ManagedIdentityCredential

        from rebalancer.transport import Urllib3Transport

        # the deployed app's token requests go through the same HTTP stack as its calls
        return ManagedIdentityCredential(
            client_id=connection.client_id, transport=Urllib3Transport()
        )
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=connection.client_id)


def _service_client(
    connection: StorageConnection,
    counter: Callable[[Any], None],
    options: Mapping[str, Any],
    credential: Any = None,
) -> Any:
    from azure.data.tables import TableServiceClient

    settings: dict[str, Any] = {
        "retry_total": 3,
        "connection_timeout": 10,
        "read_timeout": 30,
        **options,
        "raw_response_hook": counter,
    }
    settings.setdefault("transport", _transport(settings))
    if connection.connection_string is not None:
        try:
            return TableServiceClient.from_connection_string(
                connection.connection_string, **settings
            )
        except ValueError as error:
            raise StoreConfigError(
                f"{connection.setting}: not a usable storage connection string ({error})"
            ) from error
    if credential is None:
        credential = storage_credential(connection)
    return TableServiceClient(connection.table_service_uri or "", credential=credential, **settings)


def _transport(settings: Mapping[str, Any]) -> Any:
    """azure-core's transport on urllib3 (`rebalancer.transport`): the audit reads the tables
    from several threads, each on its own connection, sharing one TLS context (the CA bundle
    is loaded once, not per connection)."""
    from rebalancer.transport import Urllib3Transport

    return Urllib3Transport(
        connection_timeout=settings["connection_timeout"],
        read_timeout=settings["read_timeout"],
    )
