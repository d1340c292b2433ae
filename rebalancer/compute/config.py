"""`ArmConfig`: where and how the Compute adapter reaches Azure Resource Manager."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rebalancer.budget import DEFAULT_SHARE
from rebalancer.compute.credentials import LOOPBACK_HOSTS

if TYPE_CHECKING:
    from rebalancer.settings import Settings

PUBLIC_ENDPOINT = "https://management.azure.com"


@dataclass(frozen=True, slots=True)
class ArmConfig:
    """Where and how to reach Azure Resource Manager for one subscription."""

    subscription_id: str
    endpoint: str = PUBLIC_ENDPOINT
    """ARM endpoint: the public cloud by default; a sovereign cloud's, or armsim's."""
    credential_scopes: tuple[str, ...] = ()
    """Token scopes; empty means `<endpoint>/.default` (the public cloud's is the usual one)."""
    authority: str | None = None
    """Entra ID authority host for DefaultAzureCredential (sovereign clouds)."""
    ca_cert: str | None = None
    """PEM file of a CA to trust for the endpoint (armsim's self-signed certificate)."""
    budget_share: float = DEFAULT_SHARE
    audit_concurrency: int = 8
    max_wait: float = 60.0
    """Longest wait, in seconds, one call may spend on Retry-After or the budget. Longer waits
    are not slept through: the call fails as `throttled` with the time to come back."""
    retry_attempts: int = 4
    connection_timeout: float = 10.0
    read_timeout: float = 60.0
    flexible_protection_reads: int = 40
    """Most instance-protection GETs per Flexible inventory (possible sources only); VMs
    left unread are marked `protection_unknown`, never chosen as sources."""
    flexible_protection_ttl: float = 300.0
    """Seconds a Flexible VM's protection, once read, is reused in later inventories. Safe:
    it only steers the choice of sources, and every delete reads the VMs again first."""
    source_candidates: int = 1
    """Possible sources per zone whose protection a Flexible inventory reads: the most VMs
    one operation deletes from a zone, i.e. the app's `maxSurge`."""
    sku_cache_ttl: float = 6 * 3600.0
    usage_cache_ttl: float = 300.0
    autoscale_cache_ttl: float = 300.0
    """How long the autoscale settings an audit read serve the event-driven passes."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.endpoint)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(
                f"ARM endpoint must be an https:// URL, got {self.endpoint!r} (azure-core sends "
                "bearer tokens only over TLS)"
            )
        if not 0 < self.budget_share <= 1:
            raise ValueError(f"budget share must be in (0, 1], got {self.budget_share}")
        if self.audit_concurrency < 1:
            raise ValueError(f"audit concurrency must be >= 1, got {self.audit_concurrency}")
        if self.max_wait < 0:
            raise ValueError(f"max wait must be >= 0 seconds, got {self.max_wait}")
        if self.source_candidates < 1:
            raise ValueError(f"source candidates must be >= 1, got {self.source_candidates}")
        if self.flexible_protection_reads < 0 or self.flexible_protection_ttl < 0:
            raise ValueError(
                "flexible protection reads and ttl must be >= 0, got "
                f"{self.flexible_protection_reads} and {self.flexible_protection_ttl}"
            )

    @property
    def scopes(self) -> tuple[str, ...]:
        if self.credential_scopes:
            return self.credential_scopes
        return (self.endpoint.rstrip("/") + "/.default",)

    @property
    def loopback(self) -> bool:
        return (urlsplit(self.endpoint).hostname or "") in LOOPBACK_HOSTS

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ArmConfig:
        values: dict[str, Any] = {
            "subscription_id": settings.subscription_id,
            "endpoint": settings.arm_endpoint,
            "budget_share": settings.arm_budget_share,
            "source_candidates": settings.max_surge,
        }
        values.update(overrides)
        return cls(**values)
