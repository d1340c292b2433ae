"""The app wired to armsim (in its own process) and Azurite, as the benchmarks run it.

Nothing of the app is imported when this module is: the cold start's child imports it before
its first tick is timed, so each import the app's first tick needs is paid inside that tick.
"""

from __future__ import annotations

from typing import Any


def wire(info: dict[str, Any], store: Any, clock: Any) -> tuple[Any, Any]:
    """The app's runtime on armsim: (Compute adapter, runtime), built as `runtime_from_settings`
    builds it, with armsim's credential and CA and the benchmark's store and clock."""
    from armsim import SimCredential
    from armsim.scenario import DEFAULT_TENANT
    from rebalancer.clock import VirtualTime
    from rebalancer.compute import ArmConfig, ComputeAdapter
    from rebalancer.service import build_runtime, library_log_level
    from rebalancer.settings import load_settings

    settings = load_settings(
        {
            "REBALANCER_SUBSCRIPTION_ID": info["subscription_id"],
            "REBALANCER_MODE": "enforce",
            "REBALANCER_APP_PRINCIPAL_ID": info["app_principal_id"],
            "REBALANCER_ARM_ENDPOINT": info["endpoint"],
        }
    )
    library_log_level(settings.sdk_log_level)
    config = ArmConfig.from_settings(
        settings,
        ca_cert=info["ca_cert"],
        credential_scopes=("https://management.azure.com/.default",),
    )
    credential = SimCredential(info["app_principal_id"], info.get("tenant_id") or DEFAULT_TENANT)
    compute = ComputeAdapter(config, credential=credential, clock=VirtualTime(clock))
    return compute, build_runtime(settings, store=store, compute=compute, clock=compute.clock)


def table_store(connection_string: str, prefix: str) -> Any:
    """The app's Table Storage on Azurite (no retries: a benchmark's failure shows at once)."""
    from rebalancer.store import StorageConnection, Store

    connection = StorageConnection("bench", connection_string=connection_string)
    return Store(connection, table_prefix=prefix, retry_total=0)
