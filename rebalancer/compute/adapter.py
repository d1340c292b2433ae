"""`ComputeAdapter`: the only code that talks to Azure Compute.

Reads are ARM JSON through azure-core's pipeline (`rebalancer.compute.rest`), parsed by
`rebalancer.arm` straight into the typed values of `rebalancer.model`; writes go through
azure-mgmt-compute's client, built on the first write, start a long-running operation and
return an `ArmCall` without waiting, which `operation_status` reads later, from any process.
Every failure is an `AdapterError`; every request spends the subscription's throttling `Budget`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rebalancer import arm
from rebalancer.budget import DEFAULT_SHARE, Budget
from rebalancer.clock import Clock, SystemClock
from rebalancer.compute.credentials import LOOPBACK_HOSTS
from rebalancer.compute.errors import (
    AdapterError,
    ErrorKind,
    ScaleSetGone,
    classify,
    from_exception,
    from_response,
    parse_retry_after,
)
from rebalancer.compute.pipeline import BudgetExhausted, GovernedRetryPolicy
from rebalancer.compute.rest import COMPUTE_API_VERSION, SKU_API_VERSION, ArmReader, segment
from rebalancer.model import (
    Health,
    Instance,
    Inventory,
    OrchestrationMode,
    RollingUpgrade,
    ScaleSet,
    ScaleSetRef,
)

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.mgmt.compute import ComputeManagementClient

    from rebalancer.autoscale import AutoscaleSetting
    from rebalancer.settings import Settings

log = logging.getLogger(__name__)

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


class OperationState(StrEnum):
    IN_PROGRESS = "InProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class OperationStatus:
    """Where a started write is: in progress, succeeded, or failed with a classified error."""

    state: OperationState
    error: AdapterError | None = None
    retry_after: float | None = None
    """Seconds the status answer asked to wait before the next poll (`Retry-After`)."""
    failed_instances: tuple[tuple[str, str], ...] = ()
    """(instance id or VM name, code) of each `error.details` entry that names its `target`:
    how Compute says which VMs of a scale set write failed, and why."""

    @property
    def done(self) -> bool:
        return self.state is not OperationState.IN_PROGRESS


@dataclass(frozen=True, slots=True)
class ArmCall:
    """A write that was accepted by ARM, and what is needed to follow it up later.

    Plain data: `to_record()` goes into the operation's Table row before anything else
    happens, and `from_record()` gives it back in the next invocation.
    """

    action: str
    """`set_capacity` or `delete_instances`."""
    scale_set: str
    status_code: int
    capacity: int | None = None
    instance_ids: tuple[str, ...] = ()
    request_id: str | None = None
    correlation_id: str | None = None
    client_request_id: str | None = None
    """Our `x-ms-client-request-id`: Event Grid's `data.httpRequest.clientRequestId`."""
    async_operation_url: str | None = None
    location_url: str | None = None

    @property
    def ref(self) -> ScaleSetRef:
        return ScaleSetRef.parse(self.scale_set)

    @property
    def synchronous(self) -> bool:
        """ARM finished it in the request itself (no status to poll)."""
        return not (self.async_operation_url or self.location_url)

    def to_record(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "scale_set": self.scale_set,
            "status_code": self.status_code,
            "capacity": self.capacity,
            "instance_ids": list(self.instance_ids),
            "request_id": self.request_id,
            "correlation_id": self.correlation_id,
            "client_request_id": self.client_request_id,
            "async_operation_url": self.async_operation_url,
            "location_url": self.location_url,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ArmCall:
        return cls(
            action=record["action"],
            scale_set=record["scale_set"],
            status_code=int(record["status_code"]),
            capacity=record.get("capacity"),
            instance_ids=tuple(record.get("instance_ids") or ()),
            request_id=record.get("request_id"),
            correlation_id=record.get("correlation_id"),
            client_request_id=record.get("client_request_id"),
            async_operation_url=record.get("async_operation_url"),
            location_url=record.get("location_url"),
        )


SPOT_QUOTA_FAMILY = "lowPriorityCores"
"""The usage name of the regional Spot vCPU quota (Total Regional Low-priority vCPUs)."""


@dataclass(frozen=True, slots=True)
class Quota:
    """vCPU quota for a VM size's family in one location, and the size's vCPU count."""

    family: str
    used_vcpus: int
    limit_vcpus: int
    vcpus_per_vm: int
    regional_used_vcpus: int | None = None
    regional_limit_vcpus: int | None = None

    @property
    def headroom_vms(self) -> int:
        """How many more VMs of the size fit in the family (and regional) quota."""
        free = self.limit_vcpus - self.used_vcpus
        if self.regional_limit_vcpus is not None and self.regional_used_vcpus is not None:
            free = min(free, self.regional_limit_vcpus - self.regional_used_vcpus)
        return max(0, free // max(1, self.vcpus_per_vm))


@dataclass(slots=True)
class _Cached:
    value: Any
    expires: float


@dataclass
class _TtlCache:
    clock: Clock
    _entries: dict[tuple[str, str], _Cached] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    error_ttl: float = 60.0
    """How long a failed load is remembered, so a missing API is not asked on every call."""

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def get(self, key: tuple[str, str], ttl: float, load: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires > self.clock.monotonic():
                if isinstance(entry.value, AdapterError):
                    raise entry.value
                return entry.value
        try:
            value = load()
        except AdapterError as error:
            if error.kind not in (ErrorKind.THROTTLED, ErrorKind.TRANSIENT):
                with self._lock:
                    expires = self.clock.monotonic() + min(ttl, self.error_ttl)
                    self._entries[key] = _Cached(error, expires)
            raise
        with self._lock:
            self._entries[key] = _Cached(value, self.clock.monotonic() + ttl)
        return value


def _header(headers: Any, name: str) -> str | None:
    value = headers.get(name) if headers is not None else None
    return str(value) if value else None


class ComputeAdapter:
    """Azure Compute for one subscription. Thread-safe; create one per process and reuse it."""

    def __init__(
        self,
        config: ArmConfig,
        credential: TokenCredential | None = None,
        *,
        clock: Clock | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.budget = budget or Budget(share=config.budget_share)
        self._credential = credential
        self._client: ComputeManagementClient | None = None
        self._reader: ArmReader | None = None
        self._http: Any = None
        self._lock = threading.Lock()
        self._cache = _TtlCache(self.clock)
        self._protection: dict[tuple[str, str], tuple[tuple[bool, bool], float]] = {}
        self._protection_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------

    @property
    def client(self) -> ComputeManagementClient:
        """azure-mgmt-compute's client, for writes: built (and imported) on first use."""
        with self._lock:
            if self._client is None:
                self._client = self._build_client()
            return self._client

    @property
    def reader(self) -> ArmReader:
        """The JSON reads' pipeline: the same policies, budget, credential and transport."""
        with self._lock:
            if self._reader is None:
                self._reader = ArmReader(
                    self.config.endpoint,
                    self._credential_or_default(),
                    self.config.scopes,
                    self._retry_policy(),
                    self._shared_transport(),
                )
            return self._reader

    def _credential_or_default(self) -> TokenCredential:
        if self._credential is None:
            from azure.identity import DefaultAzureCredential

            kwargs = {"authority": self.config.authority} if self.config.authority else {}
            self._credential = DefaultAzureCredential(**kwargs)
        return self._credential

    def _retry_policy(self) -> GovernedRetryPolicy:
        """One per pipeline (a policy holds its pipeline's next one), all on one budget."""
        return GovernedRetryPolicy(
            self.budget,
            self.clock,
            max_wait=self.config.max_wait,
            attempts=self.config.retry_attempts,
        )

    def _shared_transport(self) -> Any:
        """The reads and the writes share one transport: one connection pool, one TLS
        handshake per connection."""
        if self._http is None:
            self._http = self._transport()
        return self._http

    def _build_client(self) -> ComputeManagementClient:
        from azure.mgmt.compute import ComputeManagementClient

        options: dict[str, Any] = {
            "credential_scopes": list(self.config.scopes),
            "retry_policy": self._retry_policy(),
            "transport": self._shared_transport(),
            "polling_interval": 0,
        }
        return ComputeManagementClient(
            self._credential_or_default(),
            self.config.subscription_id,
            base_url=self.config.endpoint.rstrip("/"),
            **options,
        )

    def _transport(self) -> Any:
        """The audit's threads need one connection each (`audit_concurrency` + 2 kept per
        host), or connections are dropped and opened again (a TLS handshake per request).
        The environment's proxy and CA bundle settings are read here, once
        (`rebalancer.transport`)."""
        from rebalancer.transport import Urllib3Transport

        return Urllib3Transport(
            pool=max(10, self.config.audit_concurrency + 2),
            ca_bundle=self.config.ca_cert,
            connection_timeout=self.config.connection_timeout,
            read_timeout=self.config.read_timeout,
        )

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self._client is not None:
                self._client.close()
                self._client = None
            self._http = None

    def __enter__(self) -> ComputeAdapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _translate(self, ref: ScaleSetRef | None = None) -> Iterator[None]:
        """Turn whatever the SDK raises into an AdapterError naming `ref`."""
        try:
            yield
        except AdapterError as error:
            raise error.about(ref) if ref and error.ref is None else error from None
        except BudgetExhausted as error:
            raise AdapterError(
                ErrorKind.THROTTLED,
                f"{error}: the rebalancer keeps to {self.config.budget_share:.0%} of the "
                "subscription's Compute throttling limits",
                code="ClientThrottlingBudget",
                retry_after=error.wait,
                ref=ref,
            ) from None
        except arm.ArmParseError as error:
            raise AdapterError(
                ErrorKind.INVALID, f"unreadable answer from Compute: {error}", ref=ref
            ) from None
        except Exception as error:
            translated = from_exception(error)
            if ref is not None and translated.ref is None:
                translated.ref = ref
            raise translated from None

    def _own(self, ref: ScaleSetRef) -> None:
        """Refuse a scale set of another subscription before sending anything.

        The SDK client is bound to the configured subscription and takes only a resource group
        and a name, so such a ref would silently reach this subscription's set of that name.
        """
        if ref.subscription_id.lower() != self.config.subscription_id.lower():
            raise AdapterError(
                ErrorKind.INVALID,
                f"{ref} is in subscription {ref.subscription_id}, not in "
                f"{self.config.subscription_id} that this app manages; nothing was sent",
                code="OutsideSubscription",
                ref=ref,
            )

    def _not_found_means_gone(self, ref: ScaleSetRef) -> Callable[[AdapterError], AdapterError]:
        def convert(error: AdapterError) -> AdapterError:
            if error.kind is ErrorKind.NOT_FOUND and (error.code or "").lower() not in (
                "subscriptionnotfound",
                "resourcegroupnotfound",
            ):
                return ScaleSetGone(ref, request_id=error.request_id)
            if error.kind is ErrorKind.NOT_FOUND:
                return error.about(ref)
            return error

        return convert

    # -- reads ----------------------------------------------------------------------------

    def list_scale_sets(
        self,
        resource_groups: Sequence[str] | None = None,
        *,
        left_out: Counter[str] | None = None,
    ) -> list[ScaleSet]:
        """Every zonal scale set of the subscription in the given resource groups (all when
        None or empty), matched case-insensitively. `left_out` counts the scale sets listed
        but not returned: `non_zonal`, `out_of_scope`, `unreadable`.

        The whole subscription is one paged `list_all`. A scoped app lists each resource
        group instead: its role is assigned on those groups only, and a subscription-wide list
        needs read access on the subscription."""
        wanted = {group.lower() for group in resource_groups or ()}
        documents: list[Any] = []
        if not wanted:
            with self._translate():
                documents = self._listed(
                    self._path("/providers/Microsoft.Compute/virtualMachineScaleSets"),
                    "the subscription's scale set list",
                )
        for group in sorted(wanted):
            try:
                with self._translate():
                    documents += self._listed(
                        self._group_path(group, "virtualMachineScaleSets"),
                        f"the scale set list of resource group {group}",
                    )
            except AdapterError as error:
                if error.kind is not ErrorKind.NOT_FOUND:
                    raise
                log.warning(
                    "resource group %s (REBALANCER_RESOURCE_GROUPS) was not found: %s",
                    group,
                    error,
                )
        scale_sets: list[ScaleSet] = []
        skipped: Counter[str] = Counter()
        for document in documents:
            try:
                scale_set = arm.parse_scale_set(document)
            except arm.ArmParseError as error:
                log.warning("skipping an unreadable scale set in list_all: %s", error)
                skipped["unreadable"] += 1
                continue
            if wanted and scale_set.ref.resource_group.lower() not in wanted:
                skipped["out_of_scope"] += 1
                continue
            if not scale_set.zones:
                skipped["non_zonal"] += 1
                continue
            scale_sets.append(scale_set)
        if left_out is not None:
            left_out.update(skipped)
        return scale_sets

    def get_scale_set(self, ref: ScaleSetRef) -> ScaleSet:
        self._own(ref)
        gone = self._not_found_means_gone(ref)
        try:
            with self._translate(ref):
                document = self.reader.document(
                    self._scale_set_path(ref), self._version(), what=f"GET of {ref}"
                )
                return arm.parse_scale_set(document)
        except AdapterError as error:
            raise gone(error) from None

    def latest_rolling_upgrade(self, ref: ScaleSetRef) -> RollingUpgrade | None:
        """The scale set's latest rolling upgrade (one GET), or None when it never had one."""
        self._own(ref)
        try:
            with self._translate(ref):
                document = self.reader.document(
                    self._scale_set_path(ref, "/rollingUpgrades/latest"),
                    self._version(),
                    what=f"the latest rolling upgrade of {ref}",
                )
                return arm.parse_rolling_upgrade(document)
        except AdapterError as error:
            if error.kind is ErrorKind.NOT_FOUND:
                return None
            raise

    def vm_scale_set(self, resource_group: str, vm_name: str) -> ScaleSetRef | None:
        """The scale set a VM names in `virtualMachineScaleSet.id` (one GET of the VM); None
        when the VM is gone or belongs to no scale set."""
        try:
            with self._translate():
                document = self.reader.document(
                    self._group_path(resource_group, f"virtualMachines/{segment(vm_name)}"),
                    self._version(),
                    what=f"GET of VM {vm_name}",
                )
        except AdapterError as error:
            if error.kind is ErrorKind.NOT_FOUND:
                return None
            raise
        if not isinstance(document, Mapping):
            return None
        return arm.instance_scale_set(document)

    def read_inventory(
        self,
        ref: ScaleSetRef,
        now: datetime,
        *,
        scale_set: ScaleSet | None = None,
        to_act: bool = True,
    ) -> Inventory:
        """The scale set (one GET, skipped when `scale_set` is given, e.g. from list_all) and
        its VMs (one paged list). Raises ScaleSetGone when the scale set does not exist.

        `to_act=False` (the audit, which only assesses) reads Flexible protection of the
        planned sources only; otherwise also of every VM an operation could delete from this
        observation (see `_verify_flexible_protection`)."""
        self._own(ref)
        if scale_set is None:
            scale_set = self.get_scale_set(ref)
        gone = self._not_found_means_gone(ref)
        try:
            with self._translate(ref):
                if scale_set.mode is OrchestrationMode.FLEXIBLE:
                    instances = self._flexible_instances(scale_set.ref)
                else:
                    instances = self._uniform_instances(scale_set.ref)
        except AdapterError as error:
            raise gone(error) from None
        inventory = Inventory(scale_set=scale_set, instances=instances, observed_at=now)
        if scale_set.mode is OrchestrationMode.FLEXIBLE and instances:
            try:
                inventory = self._verify_flexible_protection(inventory, to_act)
            except AdapterError as error:
                raise gone(error) from None
        return inventory

    def _uniform_instances(self, ref: ScaleSetRef) -> tuple[Instance, ...]:
        instances: tuple[Instance, ...] = ()
        for page in self.reader.pages(
            self._scale_set_path(ref, "/virtualMachines"),
            self._version(**{"$expand": "instanceView"}),
            what=f"the VM list of {ref}",
        ):
            instances += arm.parse_instances(page, OrchestrationMode.UNIFORM)
        return instances

    def _flexible_instances(self, ref: ScaleSetRef) -> tuple[Instance, ...]:
        """The read path for Flexible VMs: the virtualMachines list filtered on the scale set,
        with instance views (the scale-set VM list answers bare items for Flexible sets)."""
        instances: tuple[Instance, ...] = ()
        for page in self.reader.pages(
            self._group_path(ref.resource_group, "virtualMachines"),
            self._version(
                **{
                    "$filter": f"'virtualMachineScaleSet/id' eq '{ref.id}'",
                    "$expand": "instanceView",
                }
            ),
            what=f"the VM list of {ref}",
        ):
            documents = [doc for doc in page if arm.instance_belongs_to(doc, ref)]
            instances += arm.parse_instances(documents, OrchestrationMode.FLEXIBLE)
        return instances

    def _listed(self, path: str, what: str) -> list[Any]:
        """Every item of a paged list (Compute's api-version)."""
        pages = self.reader.pages(path, self._version(), what=what)
        return [item for page in pages for item in page]

    def _instance_document(self, ref: ScaleSetRef, vm: str) -> Mapping[str, Any] | None:
        """The scale set's VM GET (Uniform instance id or Flexible VM name); None on 404:
        the VM is gone (or the scale set is)."""
        answer = self.reader.get(
            self._scale_set_path(ref, f"/virtualMachines/{segment(vm)}"), self._version()
        )
        if answer.status == 404:
            return None
        if answer.status >= 400:
            raise answer.error()
        document = answer.json(f"GET of VM {vm} of {ref}")
        if not isinstance(document, Mapping):
            raise arm.ArmParseError(f"expected a VM object for {vm}, got {document!r:.80}")
        return document

    def _path(self, rest: str) -> str:
        return f"/subscriptions/{segment(self.config.subscription_id)}{rest}"

    def _group_path(self, resource_group: str, rest: str) -> str:
        return self._path(
            f"/resourceGroups/{segment(resource_group)}/providers/Microsoft.Compute/{rest}"
        )

    def _scale_set_path(self, ref: ScaleSetRef, rest: str = "") -> str:
        return self._group_path(
            ref.resource_group, f"virtualMachineScaleSets/{segment(ref.name)}{rest}"
        )

    @staticmethod
    def _version(api_version: str = COMPUTE_API_VERSION, **params: str) -> dict[str, str]:
        return {"api-version": api_version, **params}

    def _verify_flexible_protection(self, inventory: Inventory, to_act: bool) -> Inventory:
        """Read instance protection of the Flexible VMs a move could delete, and re-plan.

        The virtualMachines list has no `protectionPolicy`, and Azure answers the scale-set VM
        *list* of a Flexible set with bare items (names, no properties); only the scale-set VM
        GET with the VM name as instance id shows it (api-version 2023-09-01 or later; the
        SDK's default is newer).
        Rather than one GET per VM, only possible sources are read: those of the first
        `source_candidates` planned moves (what one operation takes; later moves are planned
        again before they run), and (`to_act`) the first eligible VMs of every zone an
        in-flight operation could take its sources from, because it re-chooses them from
        this observation, often when the new VMs already balance the set and nothing is
        planned. A protected one is marked and the choice made again, until every possible
        source is known to be unprotected. A protection read within `flexible_protection_ttl`
        is reused. At most `flexible_protection_reads` GETs per inventory; a possible source
        still unread then is marked `protection_unknown`: never chosen as a source, and never
        taken for protected either (an operation's own new VMs stay deletable; every delete
        reads its VMs again first).
        """
        from rebalancer import protection

        ref = inventory.scale_set.ref
        known: dict[str, protection.Flags | None] = {}
        reads_left = self.config.flexible_protection_reads
        depth = self.config.source_candidates
        unread = 0
        while True:
            possible = protection.possible_sources(inventory, depth, in_flight=to_act)
            pending = protection.unread(possible, known)
            if not pending:
                break
            for name in pending:
                flags = self._remembered_protection(ref, name)
                if flags is None and reads_left > 0:
                    flags = self.read_protection(ref, name)
                    reads_left -= 1
                unread += flags is None
                known[protection.key(name)] = flags
            inventory = protection.with_protection(inventory, known)
        if unread:
            log.warning(
                "%s: protection of %d possible source(s) not read (limit %d GETs); they are "
                "not chosen as sources this time",
                ref,
                unread,
                self.config.flexible_protection_reads,
            )
        return inventory

    def _remembered_protection(self, ref: ScaleSetRef, name: str) -> tuple[bool, bool] | None:
        with self._protection_lock:
            known = self._protection.get((ref.key, name.lower()))
        if known is None or known[1] <= self.clock.monotonic():
            return None
        return known[0]

    def read_protection(self, ref: ScaleSetRef, name: str) -> tuple[bool, bool]:
        """A fresh read of one Flexible VM's protection (remembered for later inventories):
        (protectFromScaleIn, protectFromScaleSetActions); a VM gone reads as protected, so
        it is never chosen."""
        with self._translate(ref):
            document = self._instance_document(ref, name)
            if document is None:
                return (True, True)  # gone since the list: never a source
            instance = arm.parse_instance(document, OrchestrationMode.FLEXIBLE)
        flags = (instance.protect_from_scale_in, instance.protect_from_scale_set_actions)
        expires = self.clock.monotonic() + self.config.flexible_protection_ttl
        with self._protection_lock:
            self._protection[(ref.key, name.lower())] = (flags, expires)
        return flags

    def vm_health(
        self, ref: ScaleSetRef, mode: OrchestrationMode, vms: Sequence[str]
    ) -> dict[str, Health]:
        """The health each VM's instance view reports: one GET per VM, charged to ARM's reads
        only (no scale-set list policy), so an operation can watch its new VMs get healthy.
        A VM that is gone reads `not_reported` (the full read that follows says why)."""
        self._own(ref)
        health: dict[str, Health] = {}
        for vm in vms:
            if mode is OrchestrationMode.FLEXIBLE:
                path = self._group_path(
                    ref.resource_group, f"virtualMachines/{segment(vm)}/instanceView"
                )
            else:
                path = self._scale_set_path(ref, f"/virtualMachines/{segment(vm)}/instanceView")
            try:
                with self._translate(ref):
                    view = self.reader.document(
                        path, self._version(), what=f"the instance view of VM {vm} of {ref}"
                    )
            except AdapterError as error:
                if error.kind is ErrorKind.NOT_FOUND:
                    health[vm] = Health.NOT_REPORTED
                    continue
                raise
            health[vm] = arm.instance_view_health(view if isinstance(view, Mapping) else {})
        return health

    def audit(
        self,
        resource_groups: Sequence[str] | None,
        now: datetime,
        *,
        left_out: Counter[str] | None = None,
    ) -> list[Inventory | AdapterError]:
        """Inventory of every zonal scale set in scope, read `audit_concurrency` at a time.

        A failure concerns its scale set only and takes its place in the list (with `ref`
        set). Once one read is throttled, the rest are not attempted: they report the same
        throttling, so the next pass comes back when Azure (or the budget) allows.
        """
        return self.read_inventories(self.list_scale_sets(resource_groups, left_out=left_out), now)

    def read_inventories(
        self, scale_sets: Sequence[ScaleSet], now: datetime
    ) -> list[Inventory | AdapterError]:
        """The inventory of each scale set (as listed), in their order: one page of the
        audit. Read `audit_concurrency` at a time; once one read is throttled, the rest
        report the same throttling without being sent."""
        throttled: list[AdapterError] = []

        def read(scale_set: ScaleSet) -> Inventory | AdapterError:
            if throttled:
                first = throttled[0]
                return AdapterError(
                    ErrorKind.THROTTLED,
                    f"not read: the audit was throttled ({first.message})",
                    code=first.code,
                    retry_after=first.retry_after,
                    ref=scale_set.ref,
                )
            try:
                return self.read_inventory(scale_set.ref, now, scale_set=scale_set, to_act=False)
            except AdapterError as error:
                if error.kind is ErrorKind.THROTTLED:
                    throttled.append(error)
                return error.about(scale_set.ref) if error.ref is None else error

        if not scale_sets:
            return []
        workers = min(self.config.audit_concurrency, len(scale_sets))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="audit") as pool:
            return list(pool.map(read, scale_sets))

    # -- writes ---------------------------------------------------------------------------

    def _start(
        self,
        ref: ScaleSetRef,
        begin: Callable[[Callable[[Any], None]], Any],
        make_call: Callable[[Any], ArmCall],
    ) -> ArmCall:
        captured: list[Any] = []

        def hook(pipeline_response: Any) -> None:
            captured.append(pipeline_response.http_response)

        gone = self._not_found_means_gone(ref)
        try:
            with self._translate(ref):
                begin(hook)
        except AdapterError as error:
            raise gone(error) from None
        if not captured:
            raise AdapterError(ErrorKind.TRANSIENT, "no response was recorded", ref=ref)
        return make_call(captured[-1])

    @staticmethod
    def _call_from(response: Any, **fields: Any) -> ArmCall:
        headers = response.headers
        return ArmCall(
            status_code=response.status_code,
            request_id=_header(headers, "x-ms-request-id"),
            correlation_id=_header(headers, "x-ms-correlation-request-id")
            or _header(getattr(response.request, "headers", None), "x-ms-correlation-request-id"),
            client_request_id=_header(
                getattr(response.request, "headers", None), "x-ms-client-request-id"
            ),
            async_operation_url=_header(headers, "Azure-AsyncOperation"),
            # A write answered with only `Location` (any 2xx) is not finished: poll it.
            location_url=_header(headers, "Location"),
            **fields,
        )

    def set_capacity(self, ref: ScaleSetRef, capacity: int, *, etag: str | None = None) -> ArmCall:
        """Start `PATCH sku.capacity = capacity` and return without waiting. Absolute, hence
        safe to repeat; `operation_status` follows it.

        `etag`: the scale set's ETag in the read the capacity was decided on, sent as
        `If-Match`. When the set changed since, ARM answers 412 and nothing is written: a
        `conflict` error with code `PreconditionFailed`; read again and decide again."""
        self._own(ref)
        if capacity < 0:
            raise AdapterError(ErrorKind.INVALID, f"capacity must be >= 0, got {capacity}", ref=ref)
        from azure.core import MatchConditions
        from azure.mgmt.compute.models import Sku, VirtualMachineScaleSetUpdate

        conditional: dict[str, Any] = {}
        if etag:
            conditional = {"etag": etag, "match_condition": MatchConditions.IfNotModified}

        def begin(hook: Callable[[Any], None]) -> Any:
            return self.client.virtual_machine_scale_sets.begin_update(
                ref.resource_group,
                ref.name,
                VirtualMachineScaleSetUpdate(sku=Sku(capacity=capacity)),
                polling=False,
                raw_response_hook=hook,
                headers=_correlation_headers(),
                **conditional,
            )

        return self._start(
            ref,
            begin,
            lambda response: self._call_from(
                response, action="set_capacity", scale_set=ref.id, capacity=capacity
            ),
        )

    def delete_instances(
        self,
        ref: ScaleSetRef,
        instance_ids: Iterable[str],
        *,
        still_ours: Callable[[], bool] | None = None,
        expect_capacity: int | None = None,
    ) -> ArmCall:
        """Start deleting instances (Uniform instance ids, Flexible VM names) and return
        without waiting. Lowers the capacity by as many.

        Azure does not stop anyone deleting a protected VM, so right before the delete every
        id is read again (one GET each) and protected ones are left out: the caller's
        observation may be minutes old, and a Flexible inventory reads protection of a few
        VMs only. When every id is protected, nothing is deleted and an `invalid` error with
        code `InstanceProtected` names them.

        Safe to repeat: ids that no longer exist are left out (also when ARM refuses them with
        400 "not an active ... instanceId", or 404 while the scale set exists, after which the
        VMs are listed once); when none is left, a completed call is returned.

        `still_ours` (e.g. "the lock's lease still runs") is asked right before each delete
        request, after the reads, which may have waited out throttling: when it says no,
        nothing is sent and a `conflict` error with code `LeaseExpired` is raised.

        `expect_capacity`: the capacity the delete was decided on. The delete takes no
        `If-Match`, so the scale set is read once more, last before the request (one GET): when
        someone changed the capacity since, nothing is sent and a `conflict` error with code
        `CapacityChanged` is raised. What is left is the time between that GET and the POST.
        A throttled read (the budget's share of the scale set's reads spent) does not hold the
        delete back: it goes on the observation it was decided on, as without the read.
        """
        self._own(ref)
        requested = tuple(dict.fromkeys(str(i) for i in instance_ids))
        if not requested:
            return ArmCall("delete_instances", ref.id, 200)
        ids = self._unprotected(ref, requested)
        if not ids:
            self.get_scale_set(ref)  # raises ScaleSetGone when the set itself is gone
            return ArmCall("delete_instances", ref.id, 200, instance_ids=requested)
        if expect_capacity is not None:
            self._capacity_still(ref, ids, expect_capacity)
        try:
            return self._begin_delete(ref, ids, still_ours)
        except AdapterError as error:
            if not _names_missing_instances(error):
                raise
            present = {instance.id.lower() for instance in self._current_instances(ref)}
            remaining = tuple(i for i in ids if i.lower() in present)
            if not remaining:
                return ArmCall(
                    "delete_instances", ref.id, 200, instance_ids=ids, request_id=error.request_id
                )
            if remaining == ids:
                raise
            return self._begin_delete(ref, remaining, still_ours)

    def _capacity_still(self, ref: ScaleSetRef, ids: tuple[str, ...], expected: int) -> None:
        """Raise `CapacityChanged` when the scale set's capacity is no longer `expected`."""
        try:
            capacity = self.get_scale_set(ref).capacity
        except AdapterError as error:
            if error.kind is not ErrorKind.THROTTLED:
                raise
            # Holding the delete until the read budget has room could hold it for good while
            # the set is observed often: the operation checked the capacity on a fresh read.
            log.info(
                "%s: capacity not read again before deleting %s (%s); the delete goes on the "
                "observation it was decided on",
                ref,
                ", ".join(ids),
                error,
            )
            return
        if capacity != expected:
            raise AdapterError(
                ErrorKind.CONFLICT,
                f"not deleting {', '.join(ids)}: the capacity is {capacity}, not the "
                f"{expected} the delete was decided on; someone changed it meanwhile, and the "
                "next pass decides again",
                code="CapacityChanged",
                ref=ref,
            )

    def _unprotected(self, ref: ScaleSetRef, ids: tuple[str, ...]) -> tuple[str, ...]:
        """The ids still present and unprotected now, from a fresh GET of each."""
        keep: list[str] = []
        protected: list[str] = []
        for vm in ids:
            with self._translate(ref):
                document = self._instance_document(ref, vm)
                if document is None:
                    continue  # gone already (or the scale set is): nothing to delete
                # A VM's name is its id here: Uniform instance ids need not be in the answer.
                instance = arm.parse_instance({"name": vm, **document}, OrchestrationMode.FLEXIBLE)
            if instance.protect_from_scale_in or instance.protect_from_scale_set_actions:
                protected.append(vm)
            else:
                keep.append(vm)
        if protected:
            log.warning(
                "%s: not deleting protected VM(s) %s; their owner protected them",
                ref,
                ", ".join(protected),
            )
            if not keep:
                raise AdapterError(
                    ErrorKind.INVALID,
                    f"VM(s) {', '.join(protected)} are protected (protectFromScaleIn or "
                    "protectFromScaleSetActions); nothing was deleted. Remove the protection "
                    "if they should go.",
                    code="InstanceProtected",
                    ref=ref,
                )
        return tuple(keep)

    def _current_instances(self, ref: ScaleSetRef) -> tuple[Instance, ...]:
        scale_set = self.get_scale_set(ref)
        gone = self._not_found_means_gone(ref)
        try:
            with self._translate(ref):
                if scale_set.mode is OrchestrationMode.FLEXIBLE:
                    return self._flexible_instances(ref)
                return self._uniform_instances(ref)
        except AdapterError as error:
            raise gone(error) from None

    def _begin_delete(
        self,
        ref: ScaleSetRef,
        ids: tuple[str, ...],
        still_ours: Callable[[], bool] | None = None,
    ) -> ArmCall:
        from azure.mgmt.compute.models import VirtualMachineScaleSetVMInstanceRequiredIDs

        if still_ours is not None and not still_ours():
            raise AdapterError(
                ErrorKind.CONFLICT,
                f"not deleting {', '.join(ids)}: the caller no longer holds the scale set "
                "(its lock lease ran out while reading); the next pass decides again",
                code="LeaseExpired",
                ref=ref,
            )

        def begin(hook: Callable[[Any], None]) -> Any:
            return self.client.virtual_machine_scale_sets.begin_delete_instances(
                ref.resource_group,
                ref.name,
                VirtualMachineScaleSetVMInstanceRequiredIDs(instance_ids=list(ids)),
                polling=False,
                raw_response_hook=hook,
                headers=_correlation_headers(),
            )

        try:
            return self._start(
                ref,
                begin,
                lambda response: self._call_from(
                    response, action="delete_instances", scale_set=ref.id, instance_ids=ids
                ),
            )
        except ScaleSetGone as error:
            self.get_scale_set(ref)  # raises ScaleSetGone when the set itself is gone
            raise AdapterError(
                ErrorKind.NOT_FOUND,
                f"instances {', '.join(ids)} not found",
                code="NotFound",
                status=404,
                request_id=error.request_id,
                ref=ref,
            ) from None

    def operation_status(self, call: ArmCall) -> OperationStatus:
        """Read a started write's long-running operation once (no waiting)."""
        if call.synchronous:
            return OperationStatus(OperationState.SUCCEEDED)
        url = call.async_operation_url or call.location_url or ""
        ref = call.ref
        expected = urlsplit(self.config.endpoint)
        actual = urlsplit(url)
        if (actual.scheme, actual.netloc.lower()) != (expected.scheme, expected.netloc.lower()):
            raise AdapterError(
                ErrorKind.INVALID,
                f"operation status URL {url!r} is not on the configured endpoint "
                f"{self.config.endpoint!r}; refusing to send a token there",
                ref=ref,
            )
        with self._translate(ref):
            answer = self.reader.get(url)
            status, headers = answer.status, answer.headers
            if status >= 400:
                error = from_response(status, headers, answer.body).about(ref)
                if status == 404:
                    error.message = (
                        f"the operation's status is no longer available: {error.message}"
                    )
                    return OperationStatus(OperationState.FAILED, error)
                raise error
            document = answer.json(f"the status of {call.action} on {ref}") or {}
        wait = parse_retry_after(_header(headers, "Retry-After"))
        if not call.async_operation_url:  # Location polling: 202 running, 200/204 done
            if status == 202:
                return OperationStatus(OperationState.IN_PROGRESS, retry_after=wait)
            return OperationStatus(OperationState.SUCCEEDED)
        result = _status_from_document(document, ref)
        return replace(result, retry_after=wait) if not result.done else result

    # -- autoscale ------------------------------------------------------------------------

    def autoscale_settings(self, *, fresh: bool = False) -> tuple[AutoscaleSetting, ...]:
        """The subscription's autoscale settings, one paged list (cached for
        `autoscale_cache_ttl`; `fresh` reads them again, as each audit does)."""
        from rebalancer.compute.autoscale import list_autoscale_settings

        key = ("autoscale", "")
        if fresh:
            self._cache.forget(key)

        def load() -> tuple[AutoscaleSetting, ...]:
            with self._translate():
                return list_autoscale_settings(self.reader, self.config.subscription_id)

        return self._cache.get(key, self.config.autoscale_cache_ttl, load)

    # -- quota ----------------------------------------------------------------------------

    def quota(self, location: str, sku_name: str, *, spot: bool = False) -> Quota:
        """vCPU usage and limit of the size's family in `location` (usages, cached for
        `usage_cache_ttl`) and the size's vCPUs (resource SKUs, cached for `sku_cache_ttl`).

        `spot`: Spot VMs of every size draw on one regional family, `lowPriorityCores`, and
        not on the size's family nor the regional total."""
        location_key = location.replace(" ", "").lower()
        catalog = self._cache.get(
            ("skus", location_key), self.config.sku_cache_ttl, lambda: self._sku_catalog(location)
        )
        entry = catalog.get(sku_name.lower())
        if entry is None:
            raise AdapterError(
                ErrorKind.SKU_UNAVAILABLE,
                f"VM size {sku_name} is not offered in {location} for this subscription",
                code="SkuNotAvailable",
            )
        family, vcpus = entry
        if spot:
            family = SPOT_QUOTA_FAMILY
        usages = self._cache.get(
            ("usages", location_key), self.config.usage_cache_ttl, lambda: self._usages(location)
        )
        family_usage = usages.get(family.lower())
        if family_usage is None:
            raise AdapterError(
                ErrorKind.QUOTA,
                f"no vCPU quota is reported for family {family} in {location}",
                code="QuotaNotFound",
            )
        regional = None if spot else usages.get("cores")
        return Quota(
            family=family,
            used_vcpus=family_usage[0],
            limit_vcpus=family_usage[1],
            vcpus_per_vm=vcpus,
            regional_used_vcpus=regional[0] if regional else None,
            regional_limit_vcpus=regional[1] if regional else None,
        )

    def _sku_catalog(self, location: str) -> dict[str, tuple[str, int]]:
        with self._translate():
            pages = self.reader.pages(
                self._path("/providers/Microsoft.Compute/skus"),
                self._version(SKU_API_VERSION, **{"$filter": f"location eq '{location}'"}),
                what=f"the resource SKU list of {location}",
            )
            return sku_catalog(sku for page in pages for sku in page if isinstance(sku, Mapping))

    def _usages(self, location: str) -> dict[str, tuple[int, int]]:
        with self._translate():
            pages = self.reader.pages(
                self._path(f"/providers/Microsoft.Compute/locations/{segment(location)}/usages"),
                self._version(),
                what=f"the usages of {location}",
            )
            return usage_table(u for page in pages for u in page if isinstance(u, Mapping))


def sku_catalog(documents: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, int]]:
    """Resource SKU documents -> {lowercased VM size: (family, vCPUs)}; sizes restricted for
    the whole location (not offered to the subscription) are left out."""
    catalog: dict[str, tuple[str, int]] = {}
    for sku in documents:
        if str(sku.get("resourceType", "")).lower() != "virtualmachines" or _restricted(sku):
            continue
        vcpus = next(
            (
                str(c.get("value", ""))
                for c in sku.get("capabilities") or ()
                if str(c.get("name", "")).lower() == "vcpus"
            ),
            "",
        )
        if sku.get("name") and sku.get("family") and vcpus.isdigit():
            catalog[str(sku["name"]).lower()] = (str(sku["family"]), int(vcpus))
    return catalog


def usage_table(documents: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """Usage documents -> {lowercased usage name (a family, or `cores`): (current, limit)}."""
    table: dict[str, tuple[int, int]] = {}
    for usage in documents:
        name = (usage.get("name") or {}).get("value")
        if name:
            table[str(name).lower()] = (
                int(usage.get("currentValue") or 0),
                int(usage.get("limit") or 0),
            )
    return table


def _correlation_headers() -> dict[str, str]:
    """A fresh correlation id for a write. ARM keeps a client's `x-ms-correlation-request-id`
    and reports it as the `correlationId` of the write's activity log entry and Event Grid
    event, so the app can match events to the writes it made."""
    return {"x-ms-correlation-request-id": str(uuid.uuid4())}


def _names_missing_instances(error: AdapterError) -> bool:
    """ARM's answer to a delete naming instances that do not exist (any more)."""
    if error.kind is ErrorKind.NOT_FOUND and not isinstance(error, ScaleSetGone):
        return True
    text = error.message.lower()
    return error.kind is ErrorKind.INVALID and "instanceid" in text.replace(" ", "")


def _restricted(sku: Mapping[str, Any]) -> bool:
    """A SKU restricted for the whole location (`NotAvailableForSubscription`) is unusable."""
    return any(str(r.get("type", "")).lower() == "location" for r in sku.get("restrictions") or ())


def _status_from_document(document: Any, ref: ScaleSetRef) -> OperationStatus:
    status = str((document or {}).get("status", "")).lower()
    if status in ("succeeded",):
        return OperationStatus(OperationState.SUCCEEDED)
    if status in ("failed", "canceled", "cancelled"):
        error = document.get("error") or {}
        code = error.get("code") or ("OperationPreempted" if status != "failed" else None)
        message = error.get("message") or f"the operation ended {document.get('status')}"
        classified = classify(
            status=None, code=code, message=message, details=error.get("details") or ()
        )
        if status != "failed" and classified.kind is ErrorKind.INVALID:
            classified.kind = ErrorKind.CONFLICT
        failed = tuple(
            (str(d["target"]), str(d["code"]))
            for d in error.get("details") or ()
            if isinstance(d, Mapping) and d.get("target") and d.get("code")
        )
        return OperationStatus(
            OperationState.FAILED, classified.about(ref), failed_instances=failed
        )
    return OperationStatus(OperationState.IN_PROGRESS)
