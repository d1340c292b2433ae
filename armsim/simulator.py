"""The Python face of armsim: start a simulator in one line and drive it from a test.

    with ArmSim.start(scenario) as sim:
        compute = sim.compute_client()
        compute.virtual_machine_scale_sets.begin_update(...)
        sim.clock.advance(120)
        assert sim.scale_set("rg-web", "web").zone_counts() == {"1": 4, "2": 4, "3": 5}

`sim.actor` plays outside actors (a person, autoscale), `sim.faults` injects faults,
`sim.requests` is the request log, `sim.on_event` receives each Event Grid event.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from armsim.api import Api, RequestRecord
from armsim.auth import SimCredential
from armsim.autoscale import Autoscale
from armsim.clock import Clock, VirtualClock
from armsim.errors import OperationFailure
from armsim.events import EventFacts, EventSink, HttpEventDelivery, build_event
from armsim.faults import Faults
from armsim.repairs import AutomaticRepairs
from armsim.resources import (
    ALLOCATION_FAILURES,
    VMSS_TYPE,
    Caller,
    CapacityChange,
    Operation,
    ScaleSetState,
    Vm,
    VmChange,
)
from armsim.scenario import ScaleSetSpec, Scenario
from armsim.server import SimHTTPServer, make_certificates
from armsim.throttling import Throttle
from armsim.upgrades import RollingUpgrades
from armsim.world import World

ARM_SCOPE = "https://management.azure.com/.default"
log = logging.getLogger(__name__)


# --- read-only views of the state -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmView:
    instance_id: str
    """Uniform instance id, or the Flexible VM's name."""
    name: str
    zone: str | None
    provisioning_state: str
    power_state: str
    health: str | None
    protect_from_scale_in: bool
    protect_from_scale_set_actions: bool
    latest_model: bool
    created: datetime
    resource_id: str
    failure_code: str | None
    spot: bool = False
    in_standby_pool: bool = False

    @property
    def counts(self) -> bool:
        """As Azure's zone balance counts: not being deleted, not failed for lack of capacity,
        not waiting in a standby pool."""
        if self.provisioning_state == "Deleting" or self.in_standby_pool:
            return False
        failed = self.provisioning_state == "Failed"
        return not (failed and (self.failure_code or "").lower() in ALLOCATION_FAILURES)


@dataclass(frozen=True, slots=True)
class ScaleSetView:
    resource_group: str
    name: str
    id: str
    location: str
    mode: str
    sku: str
    zones: tuple[str, ...]
    capacity: int
    provisioning_state: str
    tags: Mapping[str, str]
    platform_rebalancing: bool
    vms: tuple[VmView, ...]

    def zone_counts(self) -> dict[str, int]:
        """VMs per zone that count (not deleting, not failed), zero for empty zones."""
        counts = dict.fromkeys(self.zones, 0)
        for vm in self.vms:
            if vm.counts and vm.zone is not None:
                counts[vm.zone] = counts.get(vm.zone, 0) + 1
        return counts

    def vm(self, instance_id: str) -> VmView:
        for vm in self.vms:
            if vm.instance_id.lower() == instance_id.lower():
                return vm
        raise KeyError(f"{self.name} has no VM {instance_id!r}")

    def healthy(self) -> tuple[VmView, ...]:
        return tuple(
            vm
            for vm in self.vms
            if vm.provisioning_state == "Succeeded"
            and vm.power_state == "running"
            and vm.health == "healthy"
        )


@dataclass(frozen=True, slots=True)
class OperationView:
    id: str
    operation_name: str
    resource_id: str
    status: str
    start: datetime
    end: datetime | None
    error_code: str | None
    principal_id: str


def _vm_view(vm: Vm) -> VmView:
    return VmView(
        instance_id=vm.instance_id,
        name=vm.name,
        zone=vm.zone,
        provisioning_state=vm.provisioning_state,
        power_state=vm.power_state,
        health=vm.health,
        protect_from_scale_in=vm.protect_from_scale_in,
        protect_from_scale_set_actions=vm.protect_from_scale_set_actions,
        latest_model=vm.latest_model,
        created=vm.created,
        resource_id=vm.resource_id,
        failure_code=vm.failure.code if vm.failure else None,
        spot=vm.spot,
        in_standby_pool=vm.in_standby_pool,
    )


def _scale_set_view(ss: ScaleSetState) -> ScaleSetView:
    return ScaleSetView(
        resource_group=ss.resource_group,
        name=ss.name,
        id=ss.resource_id,
        location=ss.location,
        mode=ss.mode,
        sku=ss.sku,
        zones=ss.zones,
        capacity=ss.capacity,
        provisioning_state=ss.provisioning_state,
        tags=MappingProxyType(dict(ss.tags)),
        platform_rebalancing=ss.platform_rebalancing,
        vms=tuple(_vm_view(vm) for vm in ss.vms.values() if not vm.gone),
    )


# --- the simulator ----------------------------------------------------------------------


class ArmSim:
    """A simulated Microsoft.Compute API on 127.0.0.1 over HTTPS."""

    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        clock: Clock | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        tls: bool = True,
        event_url: str | None = None,
        throttling: bool | None = None,
        poll_delay: float = 0.02,
    ) -> None:
        self.scenario = scenario or Scenario()
        self.clock: Clock = clock or VirtualClock(self.scenario.start)
        self.latency = latency
        """Real seconds added to every request (for benchmarks)."""
        self.poll_delay = poll_delay
        """Real seconds each poll of an unfinished operation waits (keeps pollers with
        polling_interval=0 from spinning while virtual time stands still)."""
        self.faults = Faults(seed=self.scenario.seed)
        for rule in self.scenario.faults:
            self.faults.add(rule)
        enabled = self.scenario.throttling if throttling is None else throttling
        self.throttle = Throttle(enabled=enabled, style=self.scenario.throttle_header_style)
        self.on_event: EventSink | None = None
        """Called with each Event Grid event (a dict), outside the simulator's lock."""
        self.events: list[dict[str, Any]] = []
        self.sink_errors: list[BaseException] = []
        """Exceptions raised by event sinks (each also logged)."""
        self._sinks: list[EventSink] = []
        self._delivery: HttpEventDelivery | None = None
        if event_url:
            self._delivery = HttpEventDelivery(event_url)
            self._sinks.append(self._delivery)
        self._outbox: list[dict[str, Any]] = []
        self._outbox_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._log: list[RequestRecord] = []
        self._log_lock = threading.Lock()
        self.world = World(self.scenario, self.clock.now(), self.faults, self._emit)
        self.api = Api(self)
        self.actor = Actor(self)
        self.autoscale = Autoscale(self)
        self.upgrades = RollingUpgrades(self)
        self.repairs = AutomaticRepairs(self)
        """Automatic instance repairs (armsim/repairs.py)."""
        self.world.model_hooks.append(self.repairs.policy_written)
        """Rolling upgrades and their batches (armsim/upgrades.py)."""
        """Autoscale settings and their engine (armsim/autoscale.py)."""
        self._host, self._port, self._tls = host, port, tls
        self._server: SimHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.ca_cert_path: str | None = None
        self.endpoint = ""
        self.credential = SimCredential(self.scenario.app_principal_id, self.scenario.tenant_id)
        """Tokens that name the app's principal (`scenario.app_principal_id`)."""
        self.actor_credential = SimCredential(
            self.scenario.actor_principal_id, self.scenario.tenant_id
        )
        """Tokens that name an outside actor (`scenario.actor_principal_id`)."""

    # --- life cycle ---------------------------------------------------------------------

    @classmethod
    def start(cls, scenario: Scenario | None = None, **kwargs: Any) -> ArmSim:
        """Create and start a simulator; use it as a context manager to stop it."""
        sim = cls(scenario, **kwargs)
        sim.serve()
        return sim

    def serve(self) -> None:
        if self._server is not None:
            return
        context = None
        if self._tls:
            self._tmp = tempfile.TemporaryDirectory(prefix="armsim-")
            context, ca_path = make_certificates(Path(self._tmp.name))
            self.ca_cert_path = str(ca_path)
        self._server = SimHTTPServer(self._host, self._port, self.api, context)
        self.endpoint = self._server.base_url
        self.clock.subscribe(self._on_clock)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="armsim-server",
            daemon=True,
        )
        self._thread.start()
        if not self.clock.virtual:
            self._ticker = threading.Thread(target=self._tick, name="armsim-clock", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        self._stopping.set()
        self.clock.unsubscribe(self._on_clock)
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._ticker is not None:
            self._ticker.join(5)
            self._ticker = None
        if self._delivery is not None:
            self._delivery.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ArmSim:
        self.serve()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1]) if self.endpoint else 0

    @property
    def subscription_id(self) -> str:
        return self.scenario.subscription_id

    # --- clients ------------------------------------------------------------------------

    def credential_for(self, object_id: str) -> SimCredential:
        """A credential whose tokens name `object_id` (to play any principal)."""
        return SimCredential(object_id, self.scenario.tenant_id)

    def client_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments that point an azure-mgmt client at this simulator."""
        kwargs: dict[str, Any] = {
            "base_url": self.endpoint,
            "credential_scopes": [ARM_SCOPE],
            "polling_interval": 0,
        }
        if self.ca_cert_path:
            kwargs["connection_verify"] = self.ca_cert_path
        kwargs.update(overrides)
        return kwargs

    def compute_client(self, credential: Any = None, **kwargs: Any) -> Any:
        """A real `azure.mgmt.compute.ComputeManagementClient` configured for this simulator."""
        from azure.mgmt.compute import ComputeManagementClient

        return ComputeManagementClient(
            credential=credential or self.credential,
            subscription_id=self.subscription_id,
            **self.client_kwargs(**kwargs),
        )

    # --- time ---------------------------------------------------------------------------

    def advance(self, seconds: float) -> datetime:
        """Shorthand for `sim.clock.advance(seconds)`."""
        return self.clock.advance(seconds)

    def _on_clock(self, now: datetime) -> None:
        with self.world.lock:
            self.world.settle(now)
        self.flush_events()

    def _tick(self) -> None:
        while not self._stopping.wait(0.2):
            self._on_clock(self.clock.now())

    # --- state --------------------------------------------------------------------------

    def scale_set(self, resource_group: str, name: str) -> ScaleSetView:
        """A snapshot of one scale set and its VMs. Raises KeyError if it does not exist."""
        with self.world.lock:
            self.world.settle(self.clock.now())
            ss = self.world.scale_sets.get(f"{resource_group}/{name}".lower())
            if ss is None or ss.deleted:
                raise KeyError(f"no scale set {resource_group}/{name}")
            view = _scale_set_view(ss)
        self.flush_events()
        return view

    @property
    def state(self) -> tuple[ScaleSetView, ...]:
        """Snapshots of every scale set."""
        with self.world.lock:
            self.world.settle(self.clock.now())
            views = tuple(
                _scale_set_view(ss) for ss in self.world.scale_sets.values() if not ss.deleted
            )
        self.flush_events()
        return views

    def operations(self) -> tuple[OperationView, ...]:
        with self.world.lock:
            return tuple(
                OperationView(
                    id=op.id,
                    operation_name=op.operation_name,
                    resource_id=op.resource_id,
                    status=op.status,
                    start=op.start,
                    end=op.end,
                    error_code=op.failure.code if op.failure else None,
                    principal_id=op.caller.principal_id,
                )
                for op in self.world.operations.values()
            )

    def history(self, scale_set_id: str | None = None) -> tuple[VmChange, ...]:
        """The VM journal (created, provisioned, failed, health, deleting, deleted, power,
        protection), oldest first; only changes after the start, optionally for one scale set
        (its resource id, compared case-insensitively)."""
        with self.world.lock:
            self.world.settle(self.clock.now())
            journal = list(self.world.journal)
        self.flush_events()
        if scale_set_id is None:
            return tuple(journal)
        wanted = scale_set_id.lower()
        return tuple(change for change in journal if change.scale_set_id.lower() == wanted)

    def capacity_history(self, scale_set_id: str | None = None) -> tuple[CapacityChange, ...]:
        """The capacity journal (every `sku.capacity` write, and every VM delete that lowered
        the capacity by one), oldest first; only changes after the start, optionally for one
        scale set (its resource id, compared case-insensitively)."""
        with self.world.lock:
            self.world.settle(self.clock.now())
            journal = list(self.world.capacity_journal)
        if scale_set_id is None:
            return tuple(journal)
        wanted = scale_set_id.lower()
        return tuple(change for change in journal if change.scale_set_id.lower() == wanted)

    def zone_room(self, location: str, sku: str, zone: str) -> int | None:
        """Free VM slots left for `sku` in a zone (None: unlimited)."""
        with self.world.lock:
            return self.world.free.get((location.lower(), sku.lower(), zone))

    # --- request log --------------------------------------------------------------------

    def record(self, entry: RequestRecord) -> None:
        with self._log_lock:
            self._log.append(entry)

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._log_lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._log.clear()

    def clear_events(self) -> None:
        """Forget the events emitted so far (`sim.events`); sinks are not affected."""
        with self._flush_lock:
            self.events.clear()

    def clear_history(self) -> None:
        """Forget the VM journal so far (for long runs that reuse one simulator)."""
        with self.world.lock:
            self.world.journal.clear()

    # --- events -------------------------------------------------------------------------

    def add_event_sink(self, sink: EventSink) -> None:
        """Also hand every following event to `sink` (after `on_event`'s peers, in order)."""
        self._sinks.append(sink)

    def remove_event_sink(self, sink: EventSink) -> None:
        """Stop handing events to `sink`; unknown sinks are ignored."""
        if sink in self._sinks:
            self._sinks.remove(sink)

    def deliver_events_to(self, url: str) -> HttpEventDelivery:
        """POST every following event to `url` in the Event Grid schema."""
        delivery = HttpEventDelivery(url)
        self._sinks.append(delivery)
        return delivery

    def _emit(self, op: Operation) -> None:
        """Called by the world (under its lock) when an operation ends."""
        facts = EventFacts(
            op.kind, op.status, op.operation_name, op.resource_id, op.caller, op.end or op.start
        )
        self._queue_event(facts)

    def emit_rejected(self, kind: str, name: str, resource_id: str, caller: Caller) -> None:
        """A write refused synchronously (409, 403, 5xx) is reported as a Failure event."""
        self._queue_event(EventFacts(kind, "Failed", name, resource_id, caller, self.world.now))

    def _queue_event(self, facts: EventFacts) -> None:
        event = build_event(
            facts, self.subscription_id, self.scenario.tenant_id, self.world.new_id()
        )
        with self._outbox_lock:
            self._outbox.append(event)

    def flush_events(self, *, raise_errors: bool = True) -> None:
        """Hand queued events to the sinks, in order. Never called under the world lock.

        One thread delivers at a time; a sink that calls back into armsim (directly or over
        HTTP) does not wait for it: the delivering thread also hands over what that call
        queued. A sink that raises does not stop delivery to the others; the error is kept in
        `sink_errors` and, unless `raise_errors` is false (the HTTP server's case), raised
        once everything queued has been delivered.
        """
        errors: list[BaseException] = []
        while True:
            if not self._flush_lock.acquire(blocking=False):
                break
            try:
                while True:
                    with self._outbox_lock:
                        pending, self._outbox = self._outbox, []
                    if not pending:
                        break
                    for event in pending:
                        self.events.append(event)
                        sinks = list(self._sinks)
                        if self.on_event is not None:
                            sinks.append(self.on_event)
                        for sink in sinks:
                            try:
                                sink(event)
                            except Exception as error:
                                log.exception("event sink %r failed on %s", sink, event["id"])
                                self.sink_errors.append(error)
                                errors.append(error)
            finally:
                self._flush_lock.release()
            with self._outbox_lock:
                if not self._outbox:
                    break
        if errors and raise_errors:
            raise errors[0]


class Actor:
    """Outside actors: people, autoscale, the platform. Writes go through the same code as
    ARM requests, as `scenario.actor_principal_id` (or `principal_id=`), and emit events."""

    def __init__(self, sim: ArmSim) -> None:
        self._sim = sim

    def _caller(self, method: str, resource_id: str, principal_id: str | None) -> Caller:
        world = self._sim.world
        principal = principal_id or self._sim.scenario.actor_principal_id
        return Caller(
            principal_id=principal,
            claims={"idtyp": "user", "name": "outside actor"},
            method=method,
            url=f"https://management.azure.com{resource_id}?api-version=2024-07-01",
            client_request_id=world.new_id(),
            correlation_id=world.new_id(),
            client_ip="203.0.113.10",
        )

    def _run(self, action: Callable[[World], Any]) -> Any:
        world = self._sim.world
        try:
            with world.lock:
                world.settle(self._sim.clock.now())
                return action(world)
        finally:
            self._sim.flush_events()

    def _ss(self, world: World, resource_group: str, name: str) -> ScaleSetState:
        return world.find_scale_set(resource_group, name)

    def _vm(self, world: World, resource_group: str, name: str, instance_id: str) -> Vm:
        return world.find_scale_set_vm(resource_group, name, instance_id)

    # scale set writes

    def set_capacity(
        self, resource_group: str, name: str, capacity: int, *, principal_id: str | None = None
    ) -> str:
        """A person or autoscale sets `sku.capacity` (a PATCH). Returns the operation id."""

        def act(world: World) -> str:
            ss = self._ss(world, resource_group, name)
            caller = self._caller("PATCH", ss.resource_id, principal_id)
            return world.update_scale_set(ss, {"sku": {"capacity": capacity}}, caller).id

        return self._run(act)

    def update_scale_set(
        self,
        resource_group: str,
        name: str,
        body: Mapping[str, Any],
        *,
        principal_id: str | None = None,
    ) -> str:
        """Any PATCH body (tags, zones, policies, capacity)."""

        def act(world: World) -> str:
            ss = self._ss(world, resource_group, name)
            caller = self._caller("PATCH", ss.resource_id, principal_id)
            return world.update_scale_set(ss, body, caller).id

        return self._run(act)

    def set_tags(self, resource_group: str, name: str, tags: Mapping[str, str]) -> str:
        return self.update_scale_set(resource_group, name, {"tags": dict(tags)})

    def delete_instances(
        self,
        resource_group: str,
        name: str,
        instance_ids: Iterable[str],
        *,
        principal_id: str | None = None,
    ) -> str:
        def act(world: World) -> str:
            ss = self._ss(world, resource_group, name)
            caller = self._caller("POST", f"{ss.resource_id}/delete", principal_id)
            return world.delete_instances(ss, list(instance_ids), caller).id

        return self._run(act)

    def delete_scale_set(
        self, resource_group: str, name: str, *, principal_id: str | None = None
    ) -> str:
        def act(world: World) -> str:
            ss = self._ss(world, resource_group, name)
            return world.delete_scale_set(
                ss, self._caller("DELETE", ss.resource_id, principal_id)
            ).id

        return self._run(act)

    def create_scale_set(self, spec: ScaleSetSpec) -> None:
        """A scale set appears (already deployed, as a scenario would seed it); no event."""

        Scenario(scale_sets=(spec,), skus=self._sim.scenario.skus)  # validates the spec

        def act(world: World) -> None:
            if spec.key in world.scale_sets and not world.scale_sets[spec.key].deleted:
                raise ValueError(f"scale set {spec.resource_group}/{spec.name} already exists")
            world.seed_scale_set(spec)

        self._run(act)

    # single VMs

    def delete_vm(
        self, resource_group: str, name: str, instance_id: str, *, principal_id: str | None = None
    ) -> str:
        """Delete one VM (VMSS-VM DELETE for Uniform, VM DELETE for Flexible)."""

        def act(world: World) -> str:
            vm = self._vm(world, resource_group, name, instance_id)
            flexible = vm.scale_set.mode == "Flexible"
            caller = self._caller("DELETE", vm.resource_id, principal_id)
            return world.delete_vm(vm, caller, flexible_api=flexible).id

        return self._run(act)

    def protect(
        self,
        resource_group: str,
        name: str,
        instance_id: str,
        *,
        scale_in: bool = True,
        scale_set_actions: bool = False,
        principal_id: str | None = None,
    ) -> str:
        def act(world: World) -> str:
            vm = self._vm(world, resource_group, name, instance_id)
            caller = self._caller("PUT", vm.resource_id, principal_id)
            policy = {
                "protectFromScaleIn": scale_in,
                "protectFromScaleSetActions": scale_set_actions,
            }
            return world.update_protection(vm, policy, caller).id

        return self._run(act)

    def deallocate(
        self, resource_group: str, name: str, instance_id: str, *, principal_id: str | None = None
    ) -> str:
        def act(world: World) -> str:
            vm = self._vm(world, resource_group, name, instance_id)
            flexible = vm.scale_set.mode == "Flexible"
            caller = self._caller("POST", f"{vm.resource_id}/deallocate", principal_id)
            return world.deallocate_vm(vm, caller, flexible_api=flexible).id

        return self._run(act)

    def start_vm(self, resource_group: str, name: str, instance_id: str) -> None:
        """A deallocated VM is started again; it reports health after the health delay."""
        self._run(lambda world: world.start_vm(self._vm(world, resource_group, name, instance_id)))

    # platform and environment (no ARM request, no event)

    def evict_spot(
        self, resource_group: str, name: str, *, count: int = 1, zone: str | None = None
    ) -> list[str]:
        """Azure evicts up to `count` running Spot VMs (of `zone`) per the set's
        evictionPolicy; returns their instance ids."""

        def act(world: World) -> list[str]:
            return world.evict_spot(self._ss(world, resource_group, name), count, zone, world.now)

        return self._run(act)

    def set_health(self, resource_group: str, name: str, instance_id: str, health: str) -> None:
        """The application on a VM turns healthy/unhealthy/unknown (health extension report)."""
        if health not in ("healthy", "unhealthy", "unknown", "initializing"):
            raise ValueError(
                f"health must be healthy, unhealthy, unknown or initializing: {health}"
            )

        def act(world: World) -> None:
            vm = self._vm(world, resource_group, name, instance_id)
            if vm.scale_set.health_monitoring == "none":
                raise ValueError(f"{name} has no health monitoring; its VMs report no health")
            world.set_health(vm, health)

        self._run(act)

    def set_new_vm_health(self, resource_group: str, name: str, health: str) -> None:
        """What VMs created from now on report after the health delay (`initializing`:
        they never finish initializing)."""

        def act(world: World) -> None:
            self._ss(world, resource_group, name).new_vm_health = health

        self._run(act)

    def set_zone_room(self, location: str, sku: str, zone: str, available: int | None) -> None:
        """Free VM slots for `sku` in a zone; 0 makes creations there fail, None: unlimited."""
        self._run(lambda world: world.set_room(location, sku, zone, available))

    def set_quota(self, location: str, family: str, limit: int) -> None:
        """vCPU limit of a family (or `cores`, the regional total) in a location."""

        def act(world: World) -> None:
            world.quota[(location.lower(), family.lower())] = limit

        self._run(act)

    def hold(
        self,
        resource_group: str,
        name: str,
        *,
        code: str = "OperationNotAllowed",
        message: str | None = None,
    ) -> None:
        """Another operation is in progress on the scale set: its writes get 409 until
        `release`."""
        from armsim.errors import ArmError

        def act(world: World) -> None:
            ss = self._ss(world, resource_group, name)
            ss.hold = ArmError(
                409,
                code,
                message
                or f"Operation is not allowed on Virtual Machine Scale Set '{ss.name}' since "
                "another operation is in progress. Please retry after the operation completes.",
            )

        self._run(act)

    def release(self, resource_group: str, name: str) -> None:
        def act(world: World) -> None:
            self._ss(world, resource_group, name).hold = None

        self._run(act)

    def preempt(self, resource_group: str, name: str) -> bool:
        """End the scale set's running model update as Canceled with OperationPreempted, as a
        more recent operation does. Returns False when nothing was running."""

        def act(world: World) -> bool:
            ss = self._ss(world, resource_group, name)
            op = ss.model_op
            if op is None or op.done:
                return False
            failure = OperationFailure(
                "OperationPreempted",
                "Operation execution has been preempted by a more recent operation.",
            )
            world.finish(op, "Canceled", failure, world.now)
            return True

        return self._run(act)


__all__ = [
    "VMSS_TYPE",
    "Actor",
    "ArmSim",
    "OperationView",
    "ScaleSetView",
    "VmChange",
    "VmView",
]
