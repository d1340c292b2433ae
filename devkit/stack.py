"""The whole stack on loopback: armsim + Azurite + the app's runtime.

`settings_for(sim)` and `compute_for(sim, settings)` are the app's parts pointed at armsim
(its endpoint, certificate, credential and virtual clock); `Stack.runtime()` wires them with
`service.build_runtime`, as in Azure. `running_stack(scenario, store)` starts armsim;
`Drive(stack)` reconciles every opted-in scale set once per tick, checks the invariants
(devkit/invariants.py) and moves virtual time on, until the fleet settles.

Real clients throughout: azure-mgmt-compute talks HTTPS to armsim, azure-data-tables talks to
Azurite. Time is armsim's virtual clock, so a 90-minute health timeout runs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from armsim import ArmSim, Scenario
from armsim.simulator import ARM_SCOPE
from devkit.invariants import Invariants
from rebalancer.budget import Budget
from rebalancer.clock import VirtualTime
from rebalancer.compute import ArmConfig, ComputeAdapter
from rebalancer.compute.errors import AdapterError
from rebalancer.model import ScaleSetRef
from rebalancer.operation import OperationRecord, State
from rebalancer.reconciler import Reconciler
from rebalancer.service import Runtime, build_runtime
from rebalancer.settings import Settings, load_settings
from rebalancer.store import Store
from rebalancer.verdict import Outcome, Result


@dataclass
class Stack:
    sim: ArmSim
    store: Store
    compute: ComputeAdapter
    settings: Settings

    def reconciler(self, **overrides: Any) -> Reconciler:
        """A fresh reconciler sharing nothing with others but Table Storage and armsim."""
        return Reconciler(
            settings=overrides.pop("settings", self.settings),
            store=overrides.pop("store", self.store),
            compute=overrides.pop("compute", self.compute),
            clock=VirtualTime(self.sim.clock),
            **overrides,
        )

    def runtime(
        self, *, store: Store | None = None, notifier: Any = None, follow_ups: Any = None
    ) -> Runtime:
        """The app's runtime on this stack (`service.build_runtime`), on armsim's clock."""
        return build_runtime(
            self.settings,
            store=store or self.store,
            compute=self.compute,
            clock=VirtualTime(self.sim.clock),
            notifier=notifier,
            follow_ups=follow_ups,
        )

    def counts(self, resource_group: str, name: str) -> dict[str, int]:
        return self.sim.scale_set(resource_group, name).zone_counts()


def settings_for(sim: ArmSim, **env: str) -> Settings:
    values = {
        "REBALANCER_SUBSCRIPTION_ID": sim.subscription_id,
        "REBALANCER_MODE": "enforce",
        "REBALANCER_APP_PRINCIPAL_ID": sim.scenario.app_principal_id,
        "REBALANCER_ARM_ENDPOINT": sim.endpoint,
    }
    values.update({f"REBALANCER_{key.upper()}": value for key, value in env.items()})
    return load_settings(values)


def compute_for(
    sim: ArmSim,
    settings: Settings,
    *,
    budget: Budget | None = None,
    max_wait: float | None = 5.0,
    **options: Any,
) -> ComputeAdapter:
    """The real Compute adapter against armsim: its certificate, credential and clock.
    `max_wait`: longest wait for Azure one call may spend (None: the app's default);
    `options` go to `ArmConfig`."""
    if max_wait is not None:
        options["max_wait"] = max_wait
    config = ArmConfig.from_settings(
        settings, ca_cert=sim.ca_cert_path, credential_scopes=(ARM_SCOPE,), **options
    )
    return ComputeAdapter(
        config, credential=sim.credential, clock=VirtualTime(sim.clock), budget=budget
    )


@contextmanager
def running_stack(scenario: Scenario, store: Store, **env: str) -> Iterator[Stack]:
    with ArmSim.start(scenario) as sim:
        settings = settings_for(sim, **env)
        compute = compute_for(sim, settings)
        try:
            yield Stack(sim, store, compute, settings)
        finally:
            compute.close()


@dataclass
class Drive:
    stack: Stack
    step: float = 30.0
    names: tuple[tuple[str, str], ...] = ()
    """(resource group, name) of the sets to reconcile; default: every set tagged enabled."""
    reconciler: Reconciler | None = None
    checker: Invariants | None = None
    single_scale_out: bool = True
    check_every_tick: bool = True
    """Check the invariants after every tick (else only when asked, e.g. at the end)."""
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.names:
            self.names = tuple(
                (v.resource_group, v.name)
                for v in self.stack.sim.state
                if v.tags.get("zone-rebalance", "").lower() == "enabled"
            )
        self.refs = {
            name: ScaleSetRef.parse(self.stack.sim.scale_set(*name).id) for name in self.names
        }
        if self.reconciler is None:
            self.reconciler = self.stack.reconciler()
        if self.checker is None:
            self.checker = Invariants.watch(self.stack.sim, self.stack.store, self.stack.settings)

    def ref(self, name: str = "web", resource_group: str = "rg-web") -> ScaleSetRef:
        return self.refs[(resource_group, name)]

    def check(self, where: str = "", **options: Any) -> list[OperationRecord]:
        assert self.checker is not None
        options.setdefault("single_scale_out", self.single_scale_out)
        return self.checker.check(where, **options)

    def tick(self) -> list[Result]:
        assert self.reconciler is not None
        results = [self._reconcile(ref) for ref in self.refs.values()]
        self.results += results
        if self.check_every_tick:
            self.check(f"at {self.stack.sim.clock.now().isoformat()}")
        self.stack.sim.advance(self.step)
        return results

    def _reconcile(self, ref: ScaleSetRef) -> Result:
        """One call as a trigger makes it: throttling or a transient error defers it (the
        service lets Event Grid deliver again); anything else fails the test."""
        assert self.reconciler is not None
        try:
            return self.reconciler.reconcile(ref)
        except AdapterError as error:
            if not error.retryable:
                raise
            return Result(ref, Outcome.DEFERRED, detail=str(error))

    def until(self, done: Callable[[], bool], *, ticks: int = 100, what: str = "") -> int:
        for count in range(1, ticks + 1):
            self.tick()
            if done():
                return count
        raise AssertionError(f"not reached within {ticks} ticks: {what or done}")

    def records(self, name: str = "web", resource_group: str = "rg-web") -> list[OperationRecord]:
        """The set's operations, oldest first."""
        key = self.ref(name, resource_group).key
        rows = self.stack.store.history(key, limit=200)
        return sorted(
            (OperationRecord.from_json(row.body) for row in rows),
            key=lambda r: r.created_at,
        )

    def idle(self) -> bool:
        return not self.stack.store.active_operations()

    def balanced(self, name: str = "web", resource_group: str = "rg-web") -> bool:
        counts = self.stack.sim.scale_set(resource_group, name).zone_counts()
        return max(counts.values()) - min(counts.values()) <= 1

    def until_settled(self, *, ticks: int = 100) -> int:
        """Until nothing is in flight and every watched set is balanced; then a final check."""
        count = self.until(
            lambda: self.idle() and all(self.balanced(n, rg) for rg, n in self.names),
            ticks=ticks,
            what="every set balanced, nothing in flight",
        )
        self.check("at the end", settled=True)
        return count

    def until_terminal(self, *, ticks: int = 100, name: str = "web", rg: str = "rg-web") -> None:
        """Until the set has at least one operation and none is in flight."""
        self.until(
            lambda: bool(self.records(name, rg)) and self.idle(),
            ticks=ticks,
            what="an operation that ended",
        )

    def app_deletes(self) -> list[Any]:
        app = self.stack.sim.scenario.app_principal_id
        return [
            change
            for change in self.stack.sim.history()
            if change.change == "deleting" and change.principal_id == app
        ]

    def states(self, name: str = "web", resource_group: str = "rg-web") -> list[State]:
        return [r.state for r in self.records(name, resource_group)]
