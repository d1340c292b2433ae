"""`ComputeAdapter`: the only code that talks to Azure Compute.

Reads are ARM JSON through azure-core's pipeline (`rebalancer.compute.rest`), parsed by
`rebalancer.arm` straight into the typed values of `rebalancer.model`; writes go through
azure-mgmt-compute's client, built on the first write, start a long-running operation and
return an `ArmCall` without waiting, which `operation_status` reads later, from any process.
Every failure is an `AdapterError`; every request spends the subscription's throttling `Budget`.
Its configuration (`config`), the writes it returns (`calls`), quota (`quota`) and its cache of
rare reads (`cache`) are modules of their own.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rebalancer import arm
from rebalancer.budget import Budget
from rebalancer.clock import Clock, SystemClock
from rebalancer.compute.cache import TtlCache
from rebalancer.compute.calls import (
    ArmCall,
    OperationState,
    OperationStatus,
    status_from_document,
)
from rebalancer.compute.config import ArmConfig
from rebalancer.compute.errors import (
    AdapterError,
    ErrorKind,
    ScaleSetGone,
    from_exception,
    from_response,
    parse_retry_after,
)
from rebalancer.compute.pipeline import BudgetExhausted, GovernedRetryPolicy
from rebalancer.compute.quota import SPOT_QUOTA_FAMILY, Quota, sku_catalog, usage_table
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

log = logging.getLogger(__name__)


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
        self._cache = TtlCache(self.clock)
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
        result = status_from_document(document, ref)
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
