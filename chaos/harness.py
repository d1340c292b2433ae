"""The chaos harness: seeded scenarios over the real stack, with every invariant checked.

One armsim and one on-disk Azurite serve every scenario (`Servers`). A scenario gets its own
resource groups, location and table prefix, so scenarios never see each other's scale sets,
zone capacity, quota or rows, and any one of them can be replayed alone from its seed.

A scenario is a number of steps. In each step (drawn from the scenario's own random generator):
outside actors act, Azure faults are armed, Table Storage is restarted or cut off, and then
one to eight invocations run, concurrently when more than one: timer ticks and Event Grid
deliveries (late, shuffled, duplicated, hostile), each in a simulated worker process that may
die at any step boundary. After the step the invariants are checked and virtual time moves on.
Then the faults stop and the timer and the pending events run alone until every operation is
terminal and every scale set that can be balanced is balanced, or a bound is reached.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.queues
import queue
import random
import signal
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from armsim import ArmSim, FaultRule, ScaleSetSpec, ScaleSetView, Scenario, VmOverride
from armsim.simulator import ARM_SCOPE
from chaos.crash import Crash, CrashingProxy, CrashPlan
from chaos.events import Delivery, hostile_events
from chaos.invariants import Checker, Violation
from chaos.netcut import NetCut
from devkit.azurite import Azurite, connection_string
from devkit.host import Host, decode_event
from devkit.invariants import Invariants
from devkit.tables import table_names
from rebalancer import service
from rebalancer.autoscale import REASON as AT_MAXIMUM
from rebalancer.clock import VirtualTime
from rebalancer.compute import AdapterError, ArmConfig, ComputeAdapter, ErrorKind
from rebalancer.evaluator import Decision, assess
from rebalancer.model import (
    Health,
    HealthMonitoring,
    Instance,
    Inventory,
    OrchestrationMode,
    PowerState,
    PriorityMix,
    ScaleSet,
    ScaleSetRef,
    frozen_mapping,
)
from rebalancer.reconciler import Reconciler
from rebalancer.settings import OPT_IN_TAG, OptIn, Settings, load_settings
from rebalancer.store import OperationRow, StorageConnection, Store, StoreError

KINDS = ("mixed", "crash-sweep", "azure-faults", "actors", "storage", "races", "events")
SWEEP = 90
"""Crash-sweep scenarios kill their first worker at boundary 1, 2, ... SWEEP in turn."""
END_TICKS = 60
TERMINAL_TICKS = 40
TICK_SECONDS = 600.0
STEP_SECONDS = (30.0, 60.0, 60.0, 120.0, 300.0)
ROLLING = {"mode": "Rolling"}
PLATFORM_ACTORS = ("autoscale_engine", "rolling_upgrade", "repairs")
INVOCATION_TIMEOUT = 120.0

KNOWN_ISSUES: dict[str, str] = {}
"""Open product bugs the suite found, by name -> what happens. `--without NAME` leaves out the
chaos that shows one (the quick run in `make test` leaves out all) until it is fixed; the
default run throws everything. Those found so far are fixed: see docs/safety.md."""


def scenario_name(index: int) -> str:
    return f"{index:04d}-{KINDS[index % len(KINDS)]}"


def parse_scenario(name: str) -> int:
    """`17`, `0017` or `0017-azure-faults` -> 17."""
    head = name.split("-", 1)[0]
    if not head.isdigit():
        raise ValueError(f"scenario {name!r}: expected a number like 17 or a name like 0017-races")
    return int(head)


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Servers:
    sim: ArmSim
    azurite: Azurite
    netcut: NetCut
    """The app's store clients reach Azurite through this relay, which an outage cuts."""

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[Servers]:
        """armsim (virtual clock), an on-disk Azurite that can be restarted, and the relay in
        front of it, all on 127.0.0.1 at free ports; stopped on exit."""
        with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
            azurite = Azurite(location=Path(tmp) / "azurite")
            # Status polls answered with Retry-After, and Uniform lists that show a failed
            # VM without its code: the app must read its writes' outcomes and wait as asked.
            chaos = Scenario(seed=1, lro_retry_after=20, failure_codes_in_lists=("Flexible",))
            with ArmSim.start(chaos) as sim, azurite:
                netcut = NetCut(azurite.port or 0)
                try:
                    yield cls(sim, azurite, netcut)
                finally:
                    netcut.close()

    @property
    def app_connection_string(self) -> str:
        return connection_string(self.netcut.port)


# -- results ---------------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    name: str
    seed: int
    steps: int = 0
    crashes: int = 0
    crash_boundaries: Counter[str] = field(default_factory=Counter)
    azure_faults: int = 0
    storage_faults: int = 0
    actor_actions: int = 0
    bad_inputs: int = 0
    races: int = 0
    invocations: int = 0
    events_delivered: int = 0
    duplicates: int = 0
    redelivered: int = 0
    transient: int = 0
    writes_checked: int = 0
    end_ticks: int = 0
    unbalanced: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    boundaries_seen: Counter[str] = field(default_factory=Counter)
    harness_error: str | None = None
    seconds: float = 0.0
    journal_notes: list[str] = field(default_factory=list)
    """What the VM journal replay of devkit/invariants.py objected to (not counted in V)."""
    slowest_step: tuple[float, int, str] = (0.0, -1, "")
    """(wall seconds, step, what ran) of the slowest step: where time goes."""

    @property
    def faults(self) -> int:
        return self.azure_faults + self.storage_faults


ReconcilerFactory = Callable[..., Reconciler]


# -- one worker process ----------------------------------------------------------------------


class Worker:
    """A simulated Functions worker process: its own store client, Compute client and
    reconciler, behind proxies that can kill it at any boundary."""

    def __init__(self, run: ScenarioRun, plan: CrashPlan) -> None:
        self.plan = plan
        self.store = run.new_store()
        self.compute = run.new_compute(run.servers.sim.credential)
        store = CrashingProxy(self.store, "store", plan, seen=run.result.boundaries_seen)
        compute = CrashingProxy(
            self.compute, "compute", plan, self._before_call, seen=run.result.boundaries_seen
        )
        self.runtime = service.build_runtime(
            run.settings,
            store=store,  # type: ignore[arg-type]
            compute=compute,  # type: ignore[arg-type]
            clock=VirtualTime(run.sim.clock),
        )
        if run.reconciler_factory is not Reconciler:  # a reconciler made to break a rule
            self.runtime = replace(
                self.runtime,
                reconciler=run.reconciler_factory(
                    settings=run.settings,
                    store=store,
                    compute=compute,
                    clock=VirtualTime(run.sim.clock),
                ),
            )
        self.reconciler = self.runtime.reconciler
        self.host = Host(self.runtime)
        self._checker = run.checker

    def _before_call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if name in ("set_capacity", "delete_instances"):
            argument = args[1] if len(args) > 1 else next(iter(kwargs.values()))
            self._checker.before_write(self.reconciler.owner, name, args[0], argument)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.store.close()
        with contextlib.suppress(Exception):
            self.compute.close()


# -- one scenario ----------------------------------------------------------------------------


class ScenarioRun:
    def __init__(
        self,
        servers: Servers,
        seed: int,
        index: int,
        reconciler_factory: ReconcilerFactory = Reconciler,
        without: frozenset[str] = frozenset(),
    ) -> None:
        unknown = set(without) - set(KNOWN_ISSUES)
        if unknown:
            raise ValueError(f"unknown issue(s) {sorted(unknown)}; known: {sorted(KNOWN_ISSUES)}")
        self.without = without
        self.servers = servers
        self.sim = servers.sim
        self.seed = seed
        self.index = index
        self.kind = KINDS[index % len(KINDS)]
        self.name = scenario_name(index)
        self.rng = random.Random(f"{seed}/{index}")
        self.reconciler_factory = reconciler_factory
        self.result = ScenarioResult(self.name, seed)
        tag = f"{seed % 100000}x{index}"
        self.rg_in = f"rg-chaos-{tag}"
        self.rg_out = f"rg-outside-{tag}"
        self.location = f"chaos{tag}".replace("x", "z")
        self.sku = "Standard_D2s_v5"
        self.prefix = f"c{tag}"
        with self.sim.world.lock:  # VM names and ids: the same in a replay as in the full run
            self.sim.world.random.seed(f"{seed}/{index}")
        self.specs = self._scale_sets()
        for spec in self.specs:
            self.sim.actor.create_scale_set(spec)
        self.settings = self._settings()
        self.observer = self.new_store(direct=True)
        self.checker = Checker(
            self.sim, self.observer, self.settings, self.name, (self.rg_in, self.rg_out)
        )
        self.journal = Invariants.watch(
            self.sim,
            self.observer,
            self.settings,
            writable=[spec.name for spec in self.specs if spec.resource_group == self.rg_in],
        )
        """A second opinion: devkit/invariants.py replays armsim's VM journal afterwards."""
        self.delivery = Delivery(self.rng)
        self.real_events: list[dict[str, Any]] = []
        self.fault_handles: list[int] = []
        self.outage = 0
        self.storage_faulted = False
        self.held: list[tuple[str, str]] = []
        self.workers: list[Worker] = []
        self._p = self._probabilities()

    # -- setup ----------------------------------------------------------------------------

    def _probabilities(self) -> dict[str, float]:
        p = {"crash": 0.15, "actor": 0.2, "fault": 0.2, "storage": 0.03, "race": 0.2, "bad": 0.15}
        boost = {
            "crash-sweep": "crash",
            "azure-faults": "fault",
            "actors": "actor",
            "storage": "storage",
            "races": "race",
            "events": "bad",
        }.get(self.kind)
        if boost:
            p[boost] = {"storage": 0.3}.get(boost, 0.5)
        if self.kind == "crash-sweep":
            p.update(actor=0.05, fault=0.05, storage=0.0, race=0.1, bad=0.05)
        return p

    def _scale_sets(self) -> list[ScaleSetSpec]:
        rng = self.rng
        specs: list[ScaleSetSpec] = []
        # One more set, of a kind other actors act on (Spot, evicted by `_evict`; a priority
        # mix; instance mix; a standby pool), from a stream of its own: the seeded sets and
        # every seeded choice stay as they were.
        kinds = self.kinds = random.Random(f"{self.name}/{self.result.seed}/kinds")
        extra = _extra_set(kinds, self.rg_in, self.location, self.sku)
        for j in range(rng.choice((1, 1, 2, 3))):
            mode = rng.choice(("Uniform", "Uniform", "Flexible"))
            zones = rng.choice((("1", "2", "3"), ("1", "2", "3"), ("1", "2")))
            base = rng.randint(0, 2)
            counts = {z: base + rng.randint(0, 3) for z in zones}
            if sum(counts.values()) == 0:
                counts[zones[0]] = 3
            tag = rng.choice(("enabled",) * 6 + ("audit", "disabled", ""))
            overrides: list[VmOverride] = []
            fullest = max(counts, key=lambda z: counts[z])
            if counts[fullest] >= 2 and rng.random() < 0.3:
                overrides.append(VmOverride(zone=fullest, count=1, protect_from_scale_in=True))
            if counts[fullest] >= 3 and rng.random() < 0.3:
                overrides.append(VmOverride(zone=fullest, count=1, health="unhealthy"))
            if counts[fullest] >= 4 and rng.random() < 0.2:
                overrides.append(VmOverride(zone=fullest, count=1, power_state="deallocated"))
            specs.append(
                ScaleSetSpec(
                    f"vmss{j}",
                    self.rg_in,
                    location=self.location,
                    mode=mode,
                    sku=self.sku,
                    zones=zones,
                    counts=counts,
                    tags={OPT_IN_TAG: tag} if tag else {},
                    health_monitoring=(
                        "probe" if mode == "Uniform" and rng.random() < 0.3 else "extension"
                    ),
                    platform_rebalancing=rng.random() < 0.05,
                    terminate_notification_seconds=rng.choice((None, None, 300)),
                    # both health extension modes, without drawing from the seeded stream
                    health_states=("rich", "binary")[j % 2],
                    overrides=tuple(overrides),
                )
            )
        if extra is not None:
            specs.append(extra)
        specs.append(
            ScaleSetSpec(
                "outside",
                self.rg_out,
                location=self.location,
                sku=self.sku,
                counts={"1": 0, "2": 2, "3": 5},
                tags={OPT_IN_TAG: "enabled"},
            )
        )
        return specs

    def _settings(self) -> Settings:
        rng = self.rng
        env = {
            "SUBSCRIPTION_ID": self.sim.subscription_id,
            "MODE": "enforce",
            "APP_PRINCIPAL_ID": self.sim.scenario.app_principal_id,
            "ARM_ENDPOINT": self.sim.endpoint,
            "RESOURCE_GROUPS": self.rg_in,
            "COOLDOWN_MINUTES": str(rng.choice((0, 5, 10))),
            "HEALTH_TIMEOUT_MINUTES": str(rng.choice((5, 10, 20))),
            "MAX_SURGE": str(rng.choice((1, 2, 3))),
            "MAX_CONCURRENT_OPERATIONS": str(rng.choice((1, 2, 5))),
            "AUDIT_INTERVAL_MINUTES": str(rng.choice((5, 10))),
            "DEFAULT_OPT_IN": rng.choice(("audit", "enabled")),
            "STATE_TABLE_PREFIX": self.prefix,
        }
        return load_settings({f"REBALANCER_{k}": v for k, v in env.items()})

    def new_store(self, *, direct: bool = False) -> Store:
        """A store client of the app (through the relay an outage cuts), or, `direct`, the
        checker's own, which sees the Table even while the app cannot."""
        servers = self.servers
        address = servers.azurite.connection_string if direct else servers.app_connection_string
        connection = StorageConnection("chaos", connection_string=address)
        return Store(
            connection,
            table_prefix=self.prefix,
            retry_total=0,
            connection_timeout=2,
            read_timeout=10,
        )

    def new_compute(self, credential: Any) -> ComputeAdapter:
        config = ArmConfig.from_settings(
            self.settings,
            ca_cert=self.sim.ca_cert_path,
            credential_scopes=(ARM_SCOPE,),
            max_wait=5.0,
            audit_concurrency=2,
            connection_timeout=2.0,
            read_timeout=20.0,
        )
        return ComputeAdapter(config, credential=credential, clock=VirtualTime(self.sim.clock))

    def _new_worker(self, first: bool = False) -> Worker:
        crash_at: int | None = None
        if first and self.kind == "crash-sweep":
            crash_at = (self.index // len(KINDS)) % SWEEP + 1
        elif self.rng.random() < self._p["crash"]:
            crash_at = self.rng.randint(1, 60)
        return Worker(self, CrashPlan(crash_at))

    # -- events ---------------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        subject = str(event.get("subject", "")).lower()
        if f"/resourcegroups/{self.rg_in.lower()}/" in subject or (
            f"/resourcegroups/{self.rg_out.lower()}/" in subject
        ):
            self.real_events.append(event)
            self.delivery.arrive(event, self.result.steps)

    # -- running --------------------------------------------------------------------------

    def run(self, steps: int | None = None) -> ScenarioResult:
        self.sim.add_event_sink(self.on_event)
        try:
            self.sim.clear_requests()
            self.workers = [self._new_worker(first=True)]
            self.workers += [self._new_worker() for _ in range(self.rng.choice((0, 1, 2)))]
            for _ in range(self.rng.randint(0, 2)):
                self._arm_fault()
            count = steps if steps is not None else self.rng.randint(5, 8)
            for step in range(count):
                self._step(step)
            self._replay_journal(settled=False)
            self._end_phase(count)
            self.checker.at_end()
            self._replay_journal(settled=True)
        finally:
            self.sim.remove_event_sink(self.on_event)
            self._cleanup()
        r = self.result
        r.violations = list(self.checker.violations)
        r.writes_checked = self.checker.writes_checked
        r.azure_faults = sum(self.sim.faults.fired(h) for h in self.fault_handles)
        r.events_delivered = self.delivery.delivered
        r.duplicates = self.delivery.duplicates
        r.redelivered = self.delivery.redelivered
        return r

    def _step(self, step: int) -> None:
        rng, p, result = self.rng, self._p, self.result
        result.steps = step
        self.checker.step = step
        if self.outage:
            self.outage -= 1
            if not self.outage:
                self.servers.netcut.heal()
        elif not self.storage_faulted and rng.random() < p["storage"]:
            self._storage_fault()
        if rng.random() < p["fault"]:
            self._arm_fault()
        if rng.random() < p["actor"]:
            self._act()
        if self.kinds.random() < p["actor"] / 2:
            self._evict()
        invocations: list[tuple[str, Any]] = []
        if rng.random() < 0.5:
            invocations.append(("timer", None))
        invocations += [("event", payload) for payload in self.delivery.due(step)]
        if rng.random() < p["bad"]:
            bad = self._hostile()
            result.bad_inputs += len(bad)
            invocations += [("bad", payload) for payload in bad]
        race = rng.random() < p["race"]
        if race:
            extra = rng.randint(2, 8) - len(invocations)
            invocations += [("timer", None)] * max(extra, 0)
            result.races += 1
        before = self.checker.snapshot()
        started = time.monotonic()
        self._invoke_all(invocations, step, concurrent=race and len(invocations) > 1)
        took = time.monotonic() - started
        if took > result.slowest_step[0]:
            kinds = Counter(kind for kind, _ in invocations)
            result.slowest_step = (took, step, ", ".join(f"{n} {k}" for k, n in kinds.items()))
        after = self.checker.snapshot()
        self.checker.note_app_step(before, after)
        self.checker.after_step(after)
        self.sim.advance(rng.choice(STEP_SECONDS))

    # -- invocations ----------------------------------------------------------------------

    def _invoke_all(self, invocations: list[tuple[str, Any]], step: int, concurrent: bool) -> None:
        assigned = [(kind, payload, self.rng.choice(self.workers)) for kind, payload in invocations]
        if not concurrent:
            for kind, payload, worker in assigned:
                self._invoke(kind, payload, worker, step)
        else:
            threads = [
                threading.Thread(
                    target=self._invoke, args=(kind, payload, worker, step), daemon=True
                )
                for kind, payload, worker in assigned
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(INVOCATION_TIMEOUT)
                if thread.is_alive():
                    self.checker.violate(9, f"an invocation still runs after {INVOCATION_TIMEOUT}s")
        for i, worker in enumerate(self.workers):
            if worker.plan.dead:
                self.result.crashes += 1
                self.result.crash_boundaries[worker.plan.died_at or "?"] += 1
                worker.close()
                self.workers[i] = self._new_worker()

    def _invoke(self, kind: str, payload: Any, worker: Worker, step: int) -> None:
        """One invocation as the Functions host makes it; the event comes back on failure."""
        self.result.invocations += 1
        if kind != "timer":
            try:
                event = decode_event(payload)
            except (TypeError, ValueError, KeyError, AttributeError):
                self.result.outcomes["undecodable"] += 1
                return  # the host cannot decode it: the function is never called
        try:
            if kind == "timer":
                worker.host.timer()
            else:
                worker.host.deliver(event)
                worker.plan.boundary("before the event's acknowledgement")
            self.result.outcomes["ok"] += 1
        except Crash:
            self.result.outcomes["crash"] += 1
            if kind == "event":
                self.delivery.retry(payload, step)
        except service.TransientFailure:
            self.result.outcomes["transient"] += 1
            self.result.transient += 1
            if kind == "event":
                self.delivery.retry(payload, step)
        except AdapterError as error:
            if kind == "timer" and error.kind in (ErrorKind.THROTTLED, ErrorKind.TRANSIENT):
                # A timer is not retried by the host, but the next tick is the retry.
                self.result.outcomes["transient"] += 1
                self.result.transient += 1
            else:
                self._unhandled(kind, error)
        except Exception as error:
            self._unhandled(kind, error)

    def _unhandled(self, kind: str, error: Exception) -> None:
        where = "".join(traceback.format_exception(error, limit=-3)).strip().splitlines()
        self.checker.violate(9, f"{kind} invocation raised {error!r} at {' | '.join(where)}")

    def _hostile(self) -> list[dict[str, Any]]:
        in_scope = [s for s in self.specs if s.resource_group == self.rg_in and s.name != EXTRA_SET]
        spec = self.rng.choice(in_scope)
        ref = ScaleSetRef(self.sim.subscription_id, spec.resource_group, spec.name)
        outside = ScaleSetRef(self.sim.subscription_id, self.rg_out, "outside")
        return hostile_events(
            self.rng,
            self.sim.subscription_id,
            ref.id,
            outside.id,
            self.sim.scenario.app_principal_id,
            self.real_events,
        )

    # -- Azure faults ---------------------------------------------------------------------

    def _arm_fault(self) -> None:
        rng = self.rng
        count, after = rng.randint(1, 3), rng.randint(0, 6)
        target = self.rg_in
        kinds = (
            "throttle",
            "throttle",
            "error",
            "reset",
            "slow",
            "quota",
            "sku_not_available",
            "conflict",
            "preempt",
            "operation_failure",
            "allocation_failure",
            "provisioning_failure",
            "never_healthy",
            "unhealthy",
            "linked_authorization_failed",
        )
        kind = rng.choice((*kinds, "not_found"))
        reads = ("vmss.get", "vmss_vm.list", "vm.list", "vmss.list", "vmss_vm.get")
        writes = ("vmss.update", "vmss.delete_instances")
        kw: dict[str, Any] = {"count": count, "after": after, "target": target}
        if kind == "throttle":
            kw |= {"operation": rng.choice(reads + writes), "retry_after": rng.choice((1, 3, 1200))}
        elif kind == "error":
            status = rng.choice((500, 503))
            code = "InternalServerError" if status == 500 else "ServiceUnavailable"
            kw |= {"operation": rng.choice(reads + writes), "status": status, "code": code}
        elif kind in ("reset", "slow"):
            kw |= {"operation": rng.choice(reads + writes), "delay": 0.05}
        elif kind in ("quota", "sku_not_available", "conflict", "linked_authorization_failed"):
            kw |= {"operation": rng.choice(writes)}
        elif kind == "not_found":
            kw |= {"operation": rng.choice(reads)}
        elif kind == "preempt":
            kw |= {"operation": "vmss.update"}
        elif kind == "operation_failure":
            kw |= {"operation": rng.choice(writes), "code": "InternalExecutionError"}
        elif kind == "allocation_failure":
            kw |= {"operation": "placement", "zone": rng.choice(("1", "2", "3"))}
        else:
            kw |= {"operation": "vm.provision"}
        if rng.random() < 0.2 and kind in ("throttle", "error", "reset"):
            kw |= {"operation": "usage.list", "target": f"/locations/{self.location}/"}
        self.fault_handles.append(self.sim.faults.add(FaultRule(kind, **kw)))

    # -- storage faults -------------------------------------------------------------------

    def _storage_fault(self) -> None:
        """Azurite restarted (on disk: its data survives), or cut off for a step or two."""
        self.result.storage_faults += 1
        self.storage_faulted = True
        if self.kind == "storage" and self.rng.random() < 0.3:
            self.servers.azurite.restart()
        else:
            self.servers.netcut.cut()
            self.outage = self.rng.randint(1, 2)

    # -- outside actors -------------------------------------------------------------------

    def _act(self) -> None:
        rng, actor = self.rng, self.sim.actor
        targets = [
            s
            for s in self.checker.snapshot().values()
            if s.resource_group == self.rg_in and s.name != EXTRA_SET
        ]
        if not targets:
            return
        ss = rng.choice(targets)
        rg, name = ss.resource_group, ss.name
        vms = [vm for vm in ss.vms if vm.provisioning_state != "Deleting"]
        favourites = self._in_flight_vms(ss)
        pool = [vm.instance_id for vm in vms]
        pick = (
            rng.choice(favourites)
            if favourites and rng.random() < 0.6
            else (rng.choice(pool) if pool else None)
        )
        kind = rng.choice(
            (
                "autoscale_out",
                "autoscale_in",
                "delete_vm",
                "protect",
                "deallocate",
                "opt_out",
                "opt_in",
                "flap",
                "flap",
                "new_vm_health",
                "hold",
                "preempt",
                "zone_room",
                "quota",
                "add_zone",
                "platform_policy",
                "delete_scale_set",
                "autoscale_engine",
                "rolling_upgrade",
                "repairs",
            )
        )
        before = self.checker.snapshot()
        self.result.actor_actions += 1
        try:
            if kind == "autoscale_out":
                actor.set_capacity(rg, name, ss.capacity + rng.randint(1, 3))
            elif kind == "autoscale_in":
                actor.set_capacity(rg, name, max(ss.capacity - rng.randint(1, 2), 0))
            elif kind == "delete_vm" and pick:
                actor.delete_vm(rg, name, pick)
            elif kind == "protect" and pick:
                planned = self._in_flight_vms(ss, planned_sources=True)
                if planned and rng.random() < 0.5:
                    pick = rng.choice(planned)  # the source the operation is about to delete
                actor.protect(rg, name, pick, scale_in=rng.random() < 0.5, scale_set_actions=True)
            elif kind == "deallocate" and pick:
                actor.deallocate(rg, name, pick)
            elif kind == "opt_out":
                actor.set_tags(rg, name, {OPT_IN_TAG: rng.choice(("disabled", "audit"))})
            elif kind == "opt_in":
                actor.set_tags(rg, name, {OPT_IN_TAG: "enabled"})
            elif kind == "flap" and pick:
                actor.set_health(rg, name, pick, rng.choice(("unhealthy", "healthy", "unknown")))
            elif kind == "new_vm_health":
                actor.set_new_vm_health(rg, name, rng.choice(("unhealthy", "initializing")))
            elif kind == "hold":
                actor.hold(rg, name)
                self.held.append((rg, name))
            elif kind == "preempt":
                actor.preempt(rg, name)
            elif kind == "zone_room":
                actor.set_zone_room(self.location, self.sku, rng.choice(ss.zones), 0)
            elif kind == "quota":
                actor.set_quota(self.location, "standardDSv5Family", 2 * len(ss.vms))
            elif kind == "add_zone":
                actor.update_scale_set(rg, name, {"zones": [*ss.zones, str(len(ss.zones) + 1)]})
            elif kind == "platform_policy":
                policy = {"automaticZoneRebalancingPolicy": {"enabled": rng.random() < 0.5}}
                actor.update_scale_set(rg, name, {"properties": {"resiliencyPolicy": policy}})
            elif kind == "delete_scale_set" and rng.random() < 0.3:
                actor.delete_scale_set(rg, name)
            elif kind == "autoscale_engine":  # often at its maximum: moves must skip
                top = ss.capacity + rng.choice((0, 0, 1, 3))
                setting = f"{name}-autoscale"
                self.sim.autoscale.put(rg, setting, target=ss.id, minimum=1, maximum=top)
            elif kind == "rolling_upgrade":
                actor.update_scale_set(rg, name, {"properties": {"upgradePolicy": ROLLING}})
                self.sim.upgrades.start(rg, name)
            elif kind == "repairs":
                policy = {
                    "enabled": True,
                    "gracePeriod": rng.choice(("PT10M", "PT30M")),
                    "repairAction": rng.choice(("Replace", "Replace", "Reimage", "Restart")),
                }
                actor.update_scale_set(rg, name, {"properties": {"automaticRepairsPolicy": policy}})
            if kind in PLATFORM_ACTORS:
                self.result.outcomes[f"actor {kind}"] += 1
        except Exception:  # armsim refused it (409 while held, 400...): so would Azure
            self.result.outcomes["actor refused"] += 1
        self.checker.note_outside(before, self.checker.snapshot())

    def _evict(self) -> None:
        """Azure takes Spot VMs back (no event); its own stream, so the seeded one is kept."""
        kinds = self.kinds
        targets = [
            s
            for s in self.checker.snapshot().values()
            if s.resource_group == self.rg_in and any(vm.spot for vm in s.vms)
        ]
        if not targets:
            return
        ss = kinds.choice(sorted(targets, key=lambda s: s.name))
        before = self.checker.snapshot()
        self.result.actor_actions += 1
        zone = kinds.choice(ss.zones) if ss.zones else None
        self.sim.actor.evict_spot(ss.resource_group, ss.name, count=kinds.randint(1, 2), zone=zone)
        self.checker.note_outside(before, self.checker.snapshot())

    def _in_flight_vms(self, ss: ScaleSetView, *, planned_sources: bool = False) -> list[str]:
        """New VMs and chosen sources of the set's in-flight operation: what a careless person
        is most likely to touch at the worst moment."""
        from rebalancer import operation as op

        try:
            row = self.observer.active_operation(ScaleSetRef.parse(ss.id).key)
        except StoreError:
            return []
        if row is None:
            return []
        record = op.OperationRecord.from_json(row.body)
        present = {vm.instance_id for vm in ss.vms}
        wanted = [*record.created, *record.sources, *(m.source for m in record.moves)]
        if planned_sources:
            wanted = [*record.sources, *(m.source for m in record.moves)]
        return [vm for vm in wanted if vm in present]

    # -- the end: faults stop -------------------------------------------------------------

    def _calm(self) -> None:
        """Every fault stops: Azure, storage, holds, zone room, quota, unhealthy new VMs."""
        self.sim.faults.clear()
        self.outage = 0
        self.servers.netcut.heal()
        if not self.servers.azurite.running:
            self.servers.azurite.start()
        actor = self.sim.actor
        for rg, name in self.held:
            with contextlib.suppress(Exception):
                actor.release(rg, name)
        for zone in ("1", "2", "3", "4"):
            actor.set_zone_room(self.location, self.sku, zone, None)
        actor.set_quota(self.location, "standardDSv5Family", 100_000)
        for view in self.checker.snapshot().values():
            with contextlib.suppress(Exception):
                actor.set_new_vm_health(view.resource_group, view.name, "healthy")
        for worker in self.workers:
            worker.close()
        self.workers = [Worker(self, CrashPlan(None))]

    def _end_phase(self, first_step: int) -> None:
        """Faults stop; the timer and the pending events run alone. Every operation must end
        within TERMINAL_TICKS ticks of being seen, every balanceable scale set be balanced."""
        self._calm()
        first_seen: dict[str, int] = {}
        overdue: set[str] = set()
        active: list[OperationRow] = []
        for tick in range(END_TICKS):
            step = first_step + tick
            self.result.end_ticks = tick + 1
            self.checker.step = step
            before = self.checker.snapshot()
            for payload in self.delivery.due(step, everything=True):
                self._invoke("event", payload, self.workers[0], step)
            self._invoke("timer", None, self.workers[0], step)
            after = self.checker.snapshot()
            self.checker.note_app_step(before, after)
            self.checker.after_step(after)
            active = self._active_operations()
            for row in active:
                seen = first_seen.setdefault(row.operation_id, tick)
                if tick - seen > TERMINAL_TICKS and row.operation_id not in overdue:
                    overdue.add(row.operation_id)
                    self.checker.violate(
                        8,
                        f"operation {row.operation_id} on {row.scale_set_key} still "
                        f"{row.state} {TERMINAL_TICKS} ticks after faults stopped",
                    )
            if not active and not self._unbalanced():
                break
            self.sim.advance(TICK_SECONDS)
        for row in active:
            if row.operation_id not in overdue:
                self.checker.violate(
                    8, f"operation {row.operation_id} on {row.scale_set_key} still {row.state}"
                )
        self.result.unbalanced = self._unbalanced()
        self.result.outcomes["held at the autoscale maximum"] += len(self._held)
        here = f"/resourcegroups/{self.rg_in.lower()}/"
        made = [r for r in self.sim.repairs.repairs if here in r.scale_set_id.lower()]
        self.result.outcomes["repairs made"] += len(made)
        self._count_outcomes()

    def _replay_journal(self, *, settled: bool) -> None:
        """devkit/invariants.py's verdict, kept apart from the violations: it re-judges a
        finished operation when a later one deletes its new VMs, and holds the healthy floor
        absolute even when outside actors took healthy VMs away (see docs/safety.md)."""
        try:
            self.journal.check(self.name, settled=settled, single_scale_out=False)
        except AssertionError as error:
            for line in str(error).splitlines()[1:]:
                if line.strip() not in self.result.journal_notes:
                    self.result.journal_notes.append(line.strip())
        except StoreError as error:
            self.result.journal_notes.append(f"the journal replay could not read: {error}")

    def _active_operations(self) -> list[OperationRow]:
        try:
            return self.observer.active_operations()
        except StoreError as error:
            self.checker.violate(8, f"cannot read in-flight operations after the faults: {error}")
            return []

    def _unbalanced(self) -> list[str]:
        """Scale sets the app may balance that still have a move the evaluator would make,
        judged on armsim's own state (the truth, protection included)."""
        specs = {spec.name: spec for spec in self.specs}
        out = []
        self._held: list[str] = []
        for view in self.checker.snapshot().values():
            if view.resource_group != self.rg_in:
                continue
            if self.settings.opt_in(_tag(view.tags, OPT_IN_TAG)) is not OptIn.ENABLED:
                continue
            assessment = assess(_inventory(view, specs[view.name], self.sim.clock.now()))
            if assessment.decision is not Decision.MOVE:
                continue
            if self._held_by_autoscale(view):
                self._held.append(view.name)
            else:
                out.append(f"{view.name} {assessment.detail}")
        return out

    def _held_by_autoscale(self, view: ScaleSetView) -> bool:
        """Left alone correctly: armsim's autoscale setting has no room for one more VM, and
        the app's last verdict on the set says so (`autoscale_at_maximum`)."""
        maxima = [
            int(doc["properties"]["profiles"][-1]["capacity"]["maximum"])
            for doc in self.sim.autoscale.documents()
            if doc["properties"]["enabled"]
            and doc["properties"]["targetResourceUri"].lower() == view.id.lower()
        ]
        if not maxima or view.capacity + 1 <= min(maxima):
            return False
        try:
            stored = self.observer.last_assessment(ScaleSetRef.parse(view.id).key)
        except StoreError:
            return False
        return stored is not None and json.loads(stored.body).get("reason") == AT_MAXIMUM

    def _count_outcomes(self) -> None:
        from rebalancer import operation as op

        keys = {ScaleSetRef.parse(s.id).key for s in self.checker.snapshot().values()}
        keys |= {
            ScaleSetRef(self.sim.subscription_id, spec.resource_group, spec.name).key
            for spec in self.specs
        }
        for key in keys:
            try:
                rows = self.observer.history(key, limit=100)
            except StoreError:
                continue
            for row in rows:
                try:
                    record = op.OperationRecord.from_json(row.body)
                except ValueError:
                    continue  # reported by the checker
                self.result.outcomes[f"operation {record.state}"] += 1

    def _cleanup(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = []
        self.sim.faults.clear()
        self.servers.netcut.heal()
        with contextlib.suppress(StoreError, Exception):
            from azure.data.tables import TableServiceClient

            with TableServiceClient.from_connection_string(
                self.servers.azurite.connection_string
            ) as client:
                for table in table_names(self.observer):
                    client.delete_table(table)
        self.observer.close()
        for view in self.checker.snapshot().values():
            with contextlib.suppress(Exception):
                self.sim.actor.delete_scale_set(view.resource_group, view.name)
        for doc in self.sim.autoscale.documents():
            group = doc["id"].split("/")[4]
            if group.lower() == self.rg_in.lower():
                self.sim.autoscale.set_enabled(group, doc["name"], False)
        self.sim.advance(600)
        self.sim.clear_requests()
        self.sim.events.clear()


_MONITORING = {
    "extension": HealthMonitoring.EXTENSION,
    "probe": HealthMonitoring.LOAD_BALANCER_PROBE,
    "none": HealthMonitoring.NONE,
}


EXTRA_SET = "vmss-x"
"""The set of another kind (`_extra_set`): the seeded actors and hostile events leave it to
its own (Spot evictions), so that their choices among the seeded sets stay as they were."""


def _extra_set(
    kinds: random.Random, resource_group: str, location: str, sku: str
) -> ScaleSetSpec | None:
    """None, or a set of a kind other actors act on: Spot (Uniform or Flexible; `_evict`
    evicts its VMs), a Spot priority mix, instance mix or a standby pool (Flexible)."""
    kind = kinds.choice((None, None, "spot", "spot", "mix", "instance_mix", "standby"))
    if kind is None:
        return None
    mode = "Uniform" if kind == "spot" and kinds.random() < 0.5 else "Flexible"
    zones = ("1", "2", "3")
    counts = {zone: kinds.randint(0, 4) for zone in zones}
    counts["3"] = max(counts["3"], 1)
    spec = ScaleSetSpec(
        EXTRA_SET,
        resource_group,
        location=location,
        mode=mode,
        sku=sku,
        zones=zones,
        counts=counts,
        tags={OPT_IN_TAG: "enabled"},
        priority="Spot" if kind in ("spot", "mix") else "Regular",
        eviction_policy=kinds.choice(("Deallocate", "Delete")),
    )
    if kind == "mix":
        return replace(
            spec,
            base_regular_priority_count=kinds.randint(0, 3),
            regular_priority_percentage_above_base=kinds.choice((0, 25, 50, 100)),
        )
    if kind == "instance_mix":
        return replace(spec, vm_sizes=(sku, "Standard_D2as_v5"))
    if kind == "standby":
        return replace(spec, standby={"1": kinds.randint(1, 2)})
    return spec


def _inventory(view: ScaleSetView, spec: ScaleSetSpec, now: datetime) -> Inventory:
    """armsim's view of a scale set as the rebalancer's model values."""
    mix = None
    if spec.priority_mix:
        mix = PriorityMix(
            spec.base_regular_priority_count or 0, spec.regular_priority_percentage_above_base or 0
        )
    scale_set = ScaleSet(
        ref=ScaleSetRef.parse(view.id),
        location=view.location,
        zones=view.zones,
        sku_name="Mix" if spec.vm_sizes else view.sku,
        capacity=view.capacity,
        mode=OrchestrationMode(view.mode),
        provisioning_state=view.provisioning_state,
        health_monitoring=_MONITORING[spec.health_monitoring],
        platform_rebalancing=view.platform_rebalancing,
        tags=frozen_mapping(view.tags),
        spot=spec.priority == "Spot",
        priority_mix=mix,
        vm_sizes=tuple(spec.vm_sizes),
    )
    powers = {p.value for p in PowerState}
    instances = tuple(
        Instance(
            id=vm.instance_id,
            name=vm.name,
            zone=vm.zone,
            provisioning_state=vm.provisioning_state,
            power_state=PowerState(vm.power_state)
            if vm.power_state in powers
            else PowerState.UNKNOWN,
            health=Health(vm.health) if vm.health else Health.NOT_REPORTED,
            protect_from_scale_in=vm.protect_from_scale_in,
            protect_from_scale_set_actions=vm.protect_from_scale_set_actions,
            latest_model=vm.latest_model,
            created=vm.created,
            spot=vm.spot,
            in_standby_pool=vm.in_standby_pool,
        )
        for vm in view.vms
    )
    return Inventory(scale_set, instances, now)


def _tag(tags: Any, name: str) -> str | None:
    for key, value in tags.items():
        if key.lower() == name.lower():
            return value
    return None


# -- many scenarios --------------------------------------------------------------------------


@dataclass
class Summary:
    results: list[ScenarioResult] = field(default_factory=list)

    def add(self, result: ScenarioResult) -> None:
        self.results.append(result)

    @property
    def violations(self) -> list[Violation]:
        return [v for r in self.results for v in r.violations]

    @property
    def harness_errors(self) -> int:
        return sum(1 for r in self.results if r.harness_error)

    @property
    def unbalanced(self) -> int:
        return sum(len(r.unbalanced) for r in self.results)

    def total(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.results)

    def line(self) -> str:
        return (
            f"chaos: {len(self.results)} scenarios, {self.total('crashes')} crashes, "
            f"{self.total('faults')} faults, {self.total('bad_inputs')} bad inputs, "
            f"{len(self.violations)} invariant violations, {self.unbalanced} unbalanced at end"
        )


def _run_one(
    servers: Servers,
    seed: int,
    index: int,
    reconciler_factory: ReconcilerFactory,
    without: frozenset[str],
) -> ScenarioResult:
    started = time.monotonic()
    try:
        result = ScenarioRun(servers, seed, index, reconciler_factory, without).run()
        result.seconds = time.monotonic() - started
        return result
    except Exception as error:  # a bug of the harness itself: reported, never hidden
        result = ScenarioResult(scenario_name(index), seed)
        result.harness_error = "".join(traceback.format_exception(error)).strip()
        return result


def _job(
    seed: int,
    indices: list[int],
    reconciler_factory: ReconcilerFactory,
    without: frozenset[str],
    results: multiprocessing.queues.Queue[ScenarioResult | None],
) -> None:
    """One worker process of the suite: its own armsim and Azurite, a slice of scenarios."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # stop Azurite on the way out
    try:
        with Servers.running() as servers:
            for index in indices:
                results.put(_run_one(servers, seed, index, reconciler_factory, without))
    finally:
        results.put(None)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_scenarios(
    seed: int,
    indices: list[int],
    *,
    jobs: int = 1,
    reconciler_factory: ReconcilerFactory = Reconciler,
    without: frozenset[str] = frozenset(),
    on_result: Callable[[ScenarioResult], None] | None = None,
    timeout: float = 900.0,
) -> Summary:
    """Run the scenarios, in `jobs` processes (each with its own servers) when more than one.

    A scenario's outcome depends only on the seed and its index, not on which process ran it
    or what ran before it.
    """
    summary = Summary()

    def collect(result: ScenarioResult) -> None:
        summary.add(result)
        if on_result is not None:
            on_result(result)

    jobs = max(1, min(jobs, len(indices)))
    if jobs == 1:
        with Servers.running() as servers:
            for index in indices:
                collect(_run_one(servers, seed, index, reconciler_factory, without))
        return summary
    context = multiprocessing.get_context("fork")
    results: multiprocessing.queues.Queue[ScenarioResult | None] = context.Queue()
    processes = [
        context.Process(
            target=_job,
            args=(seed, indices[k::jobs], reconciler_factory, without, results),
            name=f"chaos-job-{k}",
            daemon=True,
        )
        for k in range(jobs)
    ]
    for process in processes:
        process.start()
    running = jobs
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        while running:
            try:
                item = results.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(
                    f"no scenario finished in {timeout:.0f} s: a chaos job hangs"
                ) from None
            if item is None:
                running -= 1
            else:
                collect(item)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process in processes:
            if running:  # interrupted: stop the jobs, which stop their servers
                process.terminate()
            process.join(30)
            if process.is_alive():
                process.kill()
    summary.results.sort(key=lambda r: r.name)
    return summary
