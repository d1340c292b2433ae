"""The invariants (docs/safety.md): the one catalogue, and the judge that checks them from
the outside by replaying armsim's journals.

`RULES` numbers and names every rule; the test suite, the chaos suite (chaos/invariants.py,
which checks them again right before each of the app's writes) and the demo's self-check report
a broken rule by its number here.

`Invariants.watch(sim, store, settings)` takes armsim's starting state; `check()` then replays
armsim's VM journal (who created, deleted, protected what, and each VM's health at the time),
reads the request log (with write bodies) and every operation record in Table Storage, and
raises AssertionError listing every broken rule:

1. no source deleted by the app unless a new VM of the same operation is present beside it,
   and a healthy source only beside a healthy new VM (the unhealthy-source case is allowed);
   never a deallocated or stopped one, and nothing no operation record asked for;
2. no protected VM deleted by the app;
3. every VM the app created is tracked in an operation record (`created`); once settled, none
   is left behind by a rolled-back operation;
4. at most one in-flight operation per scale set, at most `maxConcurrentOperations` at once,
   and (optionally) exactly one capacity PATCH per operation, always to its target capacity;
5. the app's deletes never take the healthy active count below the operation's baseline
   (less the healthy VMs someone else deleted, deallocated or broke since it started);
6. the app writes only to the scale sets it may change;

and, once settled, the capacity each scale set is handed back equals its owners' capacity:
the capacity at the start plus the outside changes since (armsim's capacity journal: an
absolute capacity someone wrote, a VM someone deleted), plus the app's VMs the owners adopted
by protecting them (`owners_capacity`). So no operation, whatever its outcome, leaves the
app's surplus VMs standing.

The checks read nothing from the reconciler under test: only armsim and the Table rows, so a
chaos or crash suite can call `check()` at any moment.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

from armsim import ArmSim
from devkit.tables import slots_in_use
from rebalancer.operation import OperationRecord, State
from rebalancer.settings import Settings
from rebalancer.store import Store

RULES: Mapping[int, str] = MappingProxyType(
    {
        1: "no source deleted before its replacement is healthy",
        2: "no protected VM deleted",
        3: "no VM the app created left untracked",
        4: "one operation per scale set, at most maxConcurrentOperations in all",
        5: "healthy active VMs never below the operation's starting count",
        6: "nothing done outside scope or to an opted-out scale set",
        7: "the Table state always parses",
        8: "every operation terminal within a bounded number of ticks once faults stop",
        9: "no unhandled exception other than a transient one the host retries",
        10: "the journal replay agrees",
        11: "the capacity handed back is the owners' (the start plus the outside changes)",
    }
)
"""The invariants by number (docs/safety.md). 1-6 are the never-rules; 7-11 hold once faults
stop; 10 is this module's replay as a second judge of the chaos suite."""


def own_new_vms(sim: ArmSim, record: OperationRecord) -> list[str]:
    """The VMs `record` created, less the extras Azure removed itself (overprovisioning)."""
    removed = [c for c in sim.history() if c.value == "overprovisioned"]
    extras = {(c.scale_set_id.lower(), c.instance_id) for c in removed}
    scale_set = record.scale_set_id.lower()
    return [vm for vm in record.created if (scale_set, vm) not in extras]


@dataclass(frozen=True, slots=True)
class _Vm:
    """A VM as the journal replay knows it at one moment."""

    scale_set: str
    """Lower-case scale set id."""
    id: str
    zone: str | None
    provisioning: str
    power: str
    health: str | None
    protected: bool
    creator: str | None
    """Principal whose write created it; None for the scenario's starting VMs."""

    @property
    def healthy(self) -> bool:
        running = self.provisioning == "Succeeded" and self.power == "running"
        return running and self.health == "healthy"

    @property
    def deleting(self) -> bool:
        return self.provisioning == "Deleting"


def _key(scale_set_id: str, vm_id: str) -> tuple[str, str]:
    return scale_set_id.lower(), vm_id.lower()


@dataclass
class Invariants:
    sim: ArmSim
    store: Store
    max_concurrent: int
    writable: frozenset[str]
    """Lower-case ids of the scale sets the app may write to."""
    scale_set_ids: tuple[str, ...]
    start: dict[tuple[str, str], _Vm]
    journal_offset: int
    start_capacity: dict[str, int] = field(default_factory=dict)
    """Lower-case scale set id -> `sku.capacity` at the start."""
    capacity_offset: int = 0
    checks: int = 0
    notes: list[str] = field(default_factory=list)

    @classmethod
    def watch(
        cls, sim: ArmSim, store: Store, settings: Settings, *, writable: Iterable[str] = ()
    ) -> Invariants:
        """Take the starting state. `writable`: scale set names the app may change (default:
        every set tagged zone-rebalance=enabled)."""
        views = sim.state
        names = set(writable) or {
            v.name for v in views if v.tags.get("zone-rebalance", "").lower() == "enabled"
        }
        start = {
            _key(v.id, vm.instance_id): _Vm(
                scale_set=v.id.lower(),
                id=vm.instance_id,
                zone=vm.zone,
                provisioning=vm.provisioning_state,
                power=vm.power_state,
                health=vm.health,
                protected=vm.protect_from_scale_in or vm.protect_from_scale_set_actions,
                creator=None,
            )
            for v in views
            for vm in v.vms
        }
        return cls(
            sim=sim,
            store=store,
            max_concurrent=settings.max_concurrent_operations,
            writable=frozenset(v.id.lower() for v in views if v.name in names),
            scale_set_ids=tuple(v.id for v in views),
            start=start,
            journal_offset=len(sim.history()),
            start_capacity={v.id.lower(): v.capacity for v in views},
            capacity_offset=len(sim.capacity_history()),
        )

    # -- inputs ------------------------------------------------------------------------

    def records(self) -> list[OperationRecord]:
        """Every operation record of the watched scale sets: in flight and finished."""
        seen: dict[str, OperationRecord] = {}
        for scale_set_id in self.scale_set_ids:
            for row in self.store.history(scale_set_id.lower(), limit=200):
                seen.setdefault(row.operation_id, OperationRecord.from_json(row.body))
        for row in self.store.active_operations():
            seen[row.operation_id] = OperationRecord.from_json(row.body)
        return sorted(seen.values(), key=lambda r: (r.created_at, r.operation_id))

    # -- the check ---------------------------------------------------------------------

    def check(
        self, where: str = "", *, settled: bool = False, single_scale_out: bool = True
    ) -> list[OperationRecord]:
        """Raise AssertionError naming every broken rule; return the records read.

        `settled`: nothing may be in flight any more (the end of a run). `single_scale_out`:
        each operation PATCHed capacity exactly once (true unless faults force repeats).
        """
        self.checks += 1
        records = self.records()
        problems: list[str] = []
        vms = self._replay(records, problems)
        self._tracking(records, vms, problems, settled)
        self._one_at_a_time(records, problems, settled)
        self._writes(records, problems, single_scale_out)
        if settled:
            self._capacity(records, problems)
        if problems:
            listing = "\n  ".join(problems)
            raise AssertionError(f"invariants broken{' ' + where if where else ''}:\n  {listing}")
        return records

    # 1, 2, 5: replay the journal, judging each batch of deletes the app started ---------------

    def _replay(self, records: Sequence[OperationRecord], problems: list[str]) -> dict:
        app = self.sim.scenario.app_principal_id
        vms = dict(self.start)
        journal = self.sim.history()[self.journal_offset :]
        deleted_sources: dict[str, tuple[int, int]] = {}
        self._outside_deletes: list[tuple[datetime, str, bool]] = []
        self._outside_losses: dict[tuple[str, str], datetime] = {}
        index = 0
        while index < len(journal):
            change = journal[index]
            if change.change == "deleting" and change.principal_id == app:
                batch = [change]
                while (
                    index + len(batch) < len(journal)
                    and (nxt := journal[index + len(batch)]).change == "deleting"
                    and nxt.principal_id == app
                    and nxt.time == change.time
                    and nxt.scale_set_id.lower() == change.scale_set_id.lower()
                ):
                    batch.append(nxt)
                before = dict(vms)
                for item in batch:
                    self._apply(vms, item)
                self._judge_deletes(batch, before, vms, records, deleted_sources, problems)
                index += len(batch)
                continue
            key = _key(change.scale_set_id, change.instance_id)
            was_healthy = key in vms and vms[key].healthy
            if change.change == "deleting" and change.principal_id != app:
                outside = (change.time, change.scale_set_id.lower(), was_healthy)
                self._outside_deletes.append(outside)
            self._apply(vms, change)
            if change.principal_id != app and change.change != "deleting":
                # A VM someone or something else deallocated, stopped or made unhealthy is
                # the owners' loss, as a VM they deleted is, until it is healthy again.
                if was_healthy and not (key in vms and vms[key].healthy):
                    self._outside_losses[key] = change.time
                elif key in vms and vms[key].healthy:
                    self._outside_losses.pop(key, None)
            index += 1
        return vms

    @staticmethod
    def _apply(vms: dict[tuple[str, str], _Vm], change) -> None:
        key = _key(change.scale_set_id, change.instance_id)
        if change.change == "created":
            vms[key] = _Vm(
                scale_set=change.scale_set_id.lower(),
                id=change.instance_id,
                zone=change.zone,
                provisioning="Creating",
                power="starting",
                health=None,
                protected=change.protected,
                creator=change.principal_id,
            )
            return
        vm = vms.get(key)
        if vm is None:
            return
        if change.change == "deleted":
            del vms[key]
        elif change.change == "provisioned":
            vms[key] = replace(vm, provisioning="Succeeded", power="running", health=change.health)
        elif change.change == "failed":
            vms[key] = replace(vm, provisioning="Failed", power="stopped", health=None)
        elif change.change == "health":
            vms[key] = replace(vm, health=change.value)
        elif change.change == "deleting":
            vms[key] = replace(vm, provisioning="Deleting")
        elif change.change == "power":
            vms[key] = replace(vm, power=change.value or vm.power, health=change.health)
        elif change.change == "protection":
            vms[key] = replace(vm, protected=change.protected)
        elif change.change == "reimaging":
            vms[key] = replace(vm, provisioning="Updating", power="starting", health=None)
        elif change.change == "reimaged":
            vms[key] = replace(vm, provisioning="Succeeded", power="running", health=change.health)

    def _judge_deletes(
        self,
        batch: Sequence,
        before: dict[tuple[str, str], _Vm],
        after: dict[tuple[str, str], _Vm],
        records: Sequence[OperationRecord],
        deleted_sources: dict[str, tuple[int, int]],
        problems: list[str],
    ) -> None:
        at = batch[0].time
        scale_set = batch[0].scale_set_id.lower()
        mine = [r for r in records if r.scale_set_id.lower() == scale_set]
        touched: set[str] = set()  # operations with a source in this batch: judged below
        for change in batch:
            vm = before.get(_key(change.scale_set_id, change.instance_id))
            label = f"{at.isoformat()} {change.instance_id} of {_name(scale_set)}"
            if change.protected or (vm is not None and vm.protected):
                problems.append(f"[2] {label}: the app deleted a protected VM")
            owner = _latest(
                [r for r in mine if _lower(change.instance_id) in _lower_all(r.delete_requested)],
                at,
            )
            if owner is None:
                problems.append(f"[1] {label}: deleted, but no operation record asked for it")
                continue
            if _lower(change.instance_id) in _lower_all(owner.created):
                continue  # one of the operation's own new VMs
            if _lower(change.instance_id) not in _lower_all(owner.sources):
                problems.append(
                    f"[1] {label}: deleted, neither a chosen source nor a VM that operation "
                    f"{owner.operation_id} created"
                )
                continue
            if vm is not None and vm.power in ("deallocated", "deallocating", "stopped"):
                problems.append(f"[1] {label}: a {vm.power} VM was deleted as a source")
            total, healthy = deleted_sources.get(owner.operation_id, (0, 0))
            healthy_source = vm is not None and vm.healthy
            deleted_sources[owner.operation_id] = (total + 1, healthy + int(healthy_source))
            touched.add(owner.operation_id)
        for owner in {r.operation_id: r for r in mine}.values():
            # An earlier operation is not judged again when a later one deletes its new VMs.
            if owner.operation_id not in touched:
                continue
            total, healthy = deleted_sources[owner.operation_id]
            kept = [
                after.get(_key(scale_set, vm))
                for vm in owner.kept
                if _key(scale_set, vm) in after and not after[_key(scale_set, vm)].deleting
            ]
            kept_healthy = sum(1 for vm in kept if vm is not None and vm.healthy)
            if total > len(kept) or healthy > kept_healthy:
                problems.append(
                    f"[1] {at.isoformat()} {_name(scale_set)}: operation {owner.operation_id} "
                    f"deleted {total} source(s) ({healthy} healthy) with only {len(kept)} new "
                    f"VM(s) ({kept_healthy} healthy) beside them"
                )
        owner = _latest(mine, at)
        if owner is not None:
            healthy_before = _healthy(before, scale_set)
            healthy_after = _healthy(after, scale_set)
            # Healthy VMs someone else deleted, deallocated or broke since the start lowered
            # what the owners keep.
            taken = sum(
                1
                for t, s, healthy in self._outside_deletes
                if s == scale_set and healthy and owner.created_at <= t <= at
            ) + sum(
                1
                for (s, _), t in self._outside_losses.items()
                if s == scale_set and owner.created_at <= t <= at
            )
            floor = min(owner.baseline.healthy - taken, healthy_before)
            if healthy_after < floor:
                problems.append(
                    f"[5] {at.isoformat()} {_name(scale_set)}: the app's delete took healthy "
                    f"VMs from {healthy_before} to {healthy_after}, below operation "
                    f"{owner.operation_id}'s baseline of {owner.baseline.healthy}"
                )

    # 3: every VM the app created is tracked ----------------------------------------------

    def _tracking(
        self,
        records: Sequence[OperationRecord],
        vms: dict[tuple[str, str], _Vm],
        problems: list[str],
        settled: bool,
    ) -> None:
        app = self.sim.scenario.app_principal_id
        present = {_key(view.id, vm.instance_id): vm for view in self.sim.state for vm in view.vms}
        for key, vm in vms.items():
            if vm.creator != app or key not in present:
                continue
            mine = [r for r in records if r.scale_set_id.lower() == vm.scale_set]
            tracked = [r for r in mine if _lower(vm.id) in _lower_all(r.created)]
            in_flight = any(r.active for r in mine)
            label = f"VM {vm.id} of {_name(vm.scale_set)}"
            if not tracked and (settled or not in_flight):
                problems.append(f"[3] {label}: created by the app, in no operation record")
            rolled_back = [r for r in tracked if r.state is State.ROLLED_BACK]
            if settled and rolled_back and present[key].counts and not vm.protected:
                problems.append(
                    f"[3] {label}: operation {rolled_back[-1].operation_id} rolled back but "
                    "left it behind"
                )

    # 11: the capacity handed back is the owners' ----------------------------------------

    def owners(self, records: Sequence[OperationRecord] | None = None) -> list[CapacityAccount]:
        """The owners' capacity of every watched scale set that still exists."""
        return owners_capacity(
            self.sim,
            self.start_capacity,
            records if records is not None else self.records(),
            journal_offset=self.journal_offset,
            capacity_offset=self.capacity_offset,
        )

    def _capacity(self, records: Sequence[OperationRecord], problems: list[str]) -> None:
        for account in self.owners(records):
            if account.in_flight or account.actual == account.expected:
                continue
            problems.append(f"[11] {account.describe()}")

    # 4: one operation per scale set, a bounded number at once ----------------------------

    def _one_at_a_time(
        self, records: Sequence[OperationRecord], problems: list[str], settled: bool
    ) -> None:
        by_set: dict[str, list[OperationRecord]] = {}
        for record in records:
            by_set.setdefault(record.scale_set_id.lower(), []).append(record)
        for scale_set, mine in by_set.items():
            active = [r.operation_id for r in mine if r.active]
            if len(active) > 1:
                problems.append(f"[4] {_name(scale_set)}: operations {active} in flight at once")
            for first, second in itertools.pairwise(mine):
                if first.active or second.created_at < first.updated_at:
                    problems.append(
                        f"[4] {_name(scale_set)}: operation {second.operation_id} started at "
                        f"{second.created_at.isoformat()} while {first.operation_id} "
                        f"({first.state.value}) ran until {first.updated_at.isoformat()}"
                    )
        moments: list[tuple[datetime, int]] = []
        for record in records:
            moments.append((record.created_at, 1))
            if not record.active:
                moments.append((record.updated_at, -1))
        running = peak = 0
        for _, delta in sorted(moments):
            running += delta
            peak = max(peak, running)
        if peak > self.max_concurrent:
            limit = self.max_concurrent
            problems.append(f"[4] {peak} operations ran at once; the limit is {limit}")
        slots = slots_in_use(self.store)
        if len(slots) > self.max_concurrent:
            problems.append(f"[4] {len(slots)} concurrency slots held: {slots}")
        if settled and any(r.active for r in records):
            active = [r.operation_id for r in records if r.active]
            problems.append(f"[4] operations still in flight at the end: {active}")

    # 4, 6: what the app wrote --------------------------------------------------------------

    def _writes(
        self, records: Sequence[OperationRecord], problems: list[str], single_scale_out: bool
    ) -> None:
        app = self.sim.scenario.app_principal_id
        patches: dict[str, int] = {}
        for request in self.sim.requests:
            if request.method == "GET" or request.principal_id != app:
                continue
            path = request.path.lower()
            target = next((s for s in self.writable if path.startswith(s)), None)
            if target is None:
                problems.append(f"[6] {request.method} {request.path}: outside the app's scope")
                continue
            if request.operation != "vmss.update":
                continue
            mine = [r for r in records if r.scale_set_id.lower() == target]
            owner = _latest(mine, request.time)
            capacity = ((request.body or {}).get("sku") or {}).get("capacity")
            if owner is None:
                problems.append(
                    f"[4] {request.time.isoformat()} PATCH of {_name(target)} outside any operation"
                )
                continue
            if capacity != owner.target_capacity:
                problems.append(
                    f"[4] {request.time.isoformat()} PATCH of {_name(target)} to capacity "
                    f"{capacity}; operation {owner.operation_id} targets {owner.target_capacity}"
                )
            patches[owner.operation_id] = patches.get(owner.operation_id, 0) + 1
        if single_scale_out:
            for operation_id, count in patches.items():
                if count != 1:
                    problems.append(f"[4] operation {operation_id} PATCHed capacity {count} times")


@dataclass(frozen=True, slots=True)
class CapacityAccount:
    """One scale set's capacity: what it is, and what its owners made it."""

    scale_set: str
    """Lower-case scale set id."""
    start: int
    owners: int
    """The start plus the outside changes: capacities written, VMs deleted (not the app's
    VMs of an operation that had not handed them over)."""
    adopted: tuple[str, ...]
    """VMs the app created and did not hand over that the owners protected: theirs now."""
    actual: int
    in_flight: bool
    changes: tuple[str, ...]

    @property
    def expected(self) -> int:
        return self.owners + len(self.adopted)

    def describe(self) -> str:
        adopted = ""
        if self.adopted:
            adopted = f" + {len(self.adopted)} adopted ({', '.join(self.adopted)})"
        changes = "; ".join(self.changes) or "no outside change"
        return (
            f"{_name(self.scale_set)}: capacity {self.actual} handed back, its owners' is "
            f"{self.owners}{adopted} (start {self.start}; {changes})"
        )


def owners_capacity(
    sim: ArmSim,
    start_capacity: Mapping[str, int],
    records: Sequence[OperationRecord],
    *,
    journal_offset: int = 0,
    capacity_offset: int = 0,
) -> list[CapacityAccount]:
    """Replay armsim's capacity journal: each scale set's owners' capacity now.

    Outside a write of the app, `sku.capacity` changes because someone wrote an absolute
    capacity (it becomes the owners' capacity, the app's VMs present then included) or
    deleted a VM (one less, unless it was a VM the app created and had not handed over yet:
    a successful operation hands its kept new VMs over when it asks for their sources'
    delete). The app's writes never change it: a move is capacity-neutral. An app VM the
    owners protected and that is still there counts as theirs.
    """
    app = sim.scenario.app_principal_id
    created: dict[tuple[str, str], datetime] = {}
    for change in sim.history()[journal_offset:]:
        if change.change == "created" and change.principal_id == app:
            created[_key(change.scale_set_id, change.instance_id)] = change.time
    handed: dict[tuple[str, str], datetime] = {}
    for record in records:
        if record.state is State.SUCCEEDED:
            # A kept VM stands in for its source from the moment the source's delete is
            # requested: from then on it is the owners', whatever happens to it.
            requested = [at for vm, at in record.delete_requested.items() if vm in record.sources]
            at = min(requested, default=record.updated_at)
            for vm in record.kept:
                handed[_key(record.scale_set_id, vm)] = at
    views = {view.id.lower(): view for view in sim.state}
    journal = sim.capacity_history()[capacity_offset:]
    accounts = []
    for scale_set, start in start_capacity.items():
        view = views.get(scale_set)
        if view is None:
            continue
        owners, changes = start, []
        owned: set[tuple[str, str]] = set()
        for change in journal:
            if change.scale_set_id.lower() != scale_set or change.principal_id == app:
                continue
            at = change.time
            if change.change == "write":
                owners = change.capacity
                owned |= {key for key, t in created.items() if key[0] == scale_set and t <= at}
                changes.append(f"capacity {change.capacity} written at {at.isoformat()}")
                continue
            key = _key(scale_set, change.instance_id or "")
            handed_at = handed.get(key)
            surplus = key in created and key not in owned and (handed_at is None or handed_at > at)
            if surplus:
                changes.append(f"the app's VM {change.instance_id} deleted at {at.isoformat()}")
                continue
            owners -= 1
            changes.append(f"VM {change.instance_id} deleted at {at.isoformat()}")
        adopted = tuple(
            vm.instance_id
            for vm in view.vms
            if (key := _key(scale_set, vm.instance_id)) in created
            and key not in handed
            and key not in owned
            and vm.provisioning_state != "Deleting"
            and (vm.protect_from_scale_in or vm.protect_from_scale_set_actions)
        )
        in_flight = any(r.active for r in records if r.scale_set_id.lower() == scale_set)
        accounts.append(
            CapacityAccount(
                scale_set, start, owners, adopted, view.capacity, in_flight, tuple(changes)
            )
        )
    return accounts


def _latest(records: Sequence[OperationRecord], at: datetime) -> OperationRecord | None:
    """The record that was running at `at` (the latest one started by then)."""
    started = [r for r in records if r.created_at <= at]
    return max(started, key=lambda r: r.created_at) if started else None


def _healthy(vms: dict[tuple[str, str], _Vm], scale_set: str) -> int:
    return sum(1 for vm in vms.values() if vm.scale_set == scale_set and vm.healthy)


def _lower(value: str) -> str:
    return value.lower()


def _lower_all(values: Iterable[str]) -> set[str]:
    return {value.lower() for value in values}


def _name(scale_set_id: str) -> str:
    return scale_set_id.rsplit("/", 1)[-1]
