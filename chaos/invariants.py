"""The invariants of devkit/invariants.py's catalogue (`RULES`), checked live against armsim, its
request log and the Table.

Three moments:

- `before_write`: right before the app's own `set_capacity` / `delete_instances` leaves the
  process (the worker's Compute proxy calls it). The world is looked at as it is at that
  instant: what would be deleted, what is healthy, which operation recorded the intent, who
  holds the lock.
- `after_step`: after every step of a scenario: the Table parses, slots and operations stay
  within limits, every VM the app created is tracked by an operation, and the request log
  shows no write outside scope or outside an operation.
- the harness's end phase, once faults stop: operations terminal, scale sets balanced, and
  (`at_end`) each scale set handed back at its owners' capacity: the capacity at the start
  plus the outside changes in armsim's capacity journal (devkit/invariants.py,
  `owners_capacity`), so no operation left the app's surplus VMs standing.

Outside actors are the harness's own doing, so it tells the checker which VMs they touched
(`outside_touched`); the healthy floor discounts those.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from armsim import ArmSim, ScaleSetView, VmView
from devkit.invariants import RULES, owners_capacity
from devkit.tables import lock_holder, slots_in_use
from rebalancer import operation as op
from rebalancer.model import ScaleSetRef
from rebalancer.settings import OPT_IN_TAG, Mode, OptIn, Settings
from rebalancer.store import Store, StoreError


@dataclass(frozen=True, slots=True)
class Violation:
    scenario: str
    step: int
    rule: int
    detail: str

    def describe(self) -> str:
        return f"[{self.rule}: {RULES[self.rule]}] {self.detail}"


def _key(resource_group: str, name: str) -> str:
    return f"{resource_group}/{name}".lower()


def _healthy(vm: VmView) -> bool:
    return (
        vm.provisioning_state == "Succeeded"
        and vm.power_state == "running"
        and (vm.health == "healthy")
    )


def _alive(vm: VmView) -> bool:
    return vm.provisioning_state != "Deleting"


@dataclass
class Checker:
    """Collects violations of one scenario. Thread-safe: hooks run in invocation threads."""

    sim: ArmSim
    observer: Store
    settings: Settings
    scenario: str
    resource_groups: tuple[str, ...]
    """Every resource group of the scenario (in scope or not): the sets the checker watches."""
    step: int = 0
    violations: list[Violation] = field(default_factory=list)
    writes_checked: int = 0
    unverified: int = 0
    app_created: dict[str, set[str]] = field(default_factory=dict)
    """Scale set key -> ids of VMs that appeared while only the app acted."""
    tracked: set[tuple[str, str]] = field(default_factory=set)
    outside_touched: dict[str, set[str]] = field(default_factory=dict)
    deleted_ids: set[tuple[str, str]] = field(default_factory=set)
    """(scale set key, VM id) of every delete the hook saw: the request log must match."""
    _sources_deleted: dict[str, dict[str, bool]] = field(default_factory=dict)
    _log_seen: int = 0
    _orphans: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    start_capacity: dict[str, int] = field(default_factory=dict)
    """Lower-case scale set id -> `sku.capacity` when the checker was made."""
    journal_offsets: tuple[int, int] = (0, 0)
    """Lengths of armsim's VM and capacity journals then."""

    def __post_init__(self) -> None:
        self.start_capacity = {v.id.lower(): v.capacity for v in self.snapshot().values()}
        self.journal_offsets = (len(self.sim.history()), len(self.sim.capacity_history()))

    # -- reporting ------------------------------------------------------------------------

    def violate(self, rule: int, detail: str) -> None:
        with self._lock:
            self.violations.append(Violation(self.scenario, self.step, rule, detail))

    # -- views ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, ScaleSetView]:
        watched = {rg.lower() for rg in self.resource_groups}
        return {
            _key(v.resource_group, v.name): v
            for v in self.sim.state
            if v.resource_group.lower() in watched
        }

    def in_scope(self, resource_group: str) -> bool:
        return self.settings.in_scope(self.settings.subscription_id, resource_group)

    # -- outside actors and app steps -----------------------------------------------------

    def note_outside(self, before: dict[str, ScaleSetView], after: dict[str, ScaleSetView]) -> None:
        """VMs an outside actor changed (gone, deleting, power, health, protection)."""
        for key, old in before.items():
            new = after.get(key)
            now = {vm.instance_id.lower(): vm for vm in new.vms} if new else {}
            touched = self.outside_touched.setdefault(key, set())
            for vm in old.vms:
                current = now.get(vm.instance_id.lower())
                if current is None or (
                    current.provisioning_state,
                    current.power_state,
                    current.health,
                ) != (vm.provisioning_state, vm.power_state, vm.health):
                    touched.add(vm.instance_id.lower())

    def note_app_step(
        self, before: dict[str, ScaleSetView], after: dict[str, ScaleSetView]
    ) -> None:
        """VMs that appeared while only the app acted were created by it."""
        for key, new in after.items():
            old = before.get(key)
            known = {vm.instance_id.lower() for vm in old.vms} if old else set()
            appeared = {vm.instance_id.lower() for vm in new.vms} - known
            if appeared and old is not None:
                self.app_created.setdefault(key, set()).update(appeared)

    # -- the write hook -------------------------------------------------------------------

    def before_write(self, owner: str, method: str, ref: ScaleSetRef, argument: object) -> None:
        """The app is about to send `set_capacity(ref, n)` or `delete_instances(ref, ids)`."""
        self.writes_checked += 1
        where = f"{method} on {ref.resource_group}/{ref.name}"
        if not self.in_scope(ref.resource_group):
            self.violate(6, f"{where}: resource group outside REBALANCER_RESOURCE_GROUPS")
            return
        try:
            view = self.sim.scale_set(ref.resource_group, ref.name)
        except KeyError:
            return  # gone: Azure answers 404, nothing happens
        try:
            row = self.observer.active_operation(ref.key)
            holder = lock_holder(self.observer, ref.key, self.sim.clock.now())
        except StoreError:
            self.unverified += 1
            return
        if row is None:
            self.violate(4, f"{where}: no in-flight operation recorded before the call")
            return
        if holder is None or not (holder == owner or holder.startswith(f"{owner}/")):
            # The lock belongs to a pass: its owner is the process's, or that plus a suffix.
            self.violate(4, f"{where}: sent by {owner} while the lock is held by {holder}")
        record = op.OperationRecord.from_json(row.body)
        opted = self.settings.opt_in(_tag(view, OPT_IN_TAG))
        standing_down = (
            opted is not OptIn.ENABLED
            or self.settings.mode is not Mode.ENFORCE
            or view.platform_rebalancing
        )
        if method == "set_capacity":
            self._check_scale_out(where, record, int(argument), standing_down)  # type: ignore[call-overload]
        else:
            ids = tuple(str(i) for i in argument)  # type: ignore[attr-defined]
            self._check_delete(where, view, record, ids, standing_down)

    def _check_scale_out(
        self, where: str, record: op.OperationRecord, capacity: int, standing_down: bool
    ) -> None:
        if standing_down:
            self.violate(6, f"{where}: capacity {capacity} requested while the set is opted out")
        if record.state is not op.State.SCALING_OUT or capacity != record.target_capacity:
            self.violate(
                3,
                f"{where}: capacity {capacity} not the recorded intent (state "
                f"{record.state}, target {record.target_capacity})",
            )

    def _check_delete(
        self,
        where: str,
        view: ScaleSetView,
        record: op.OperationRecord,
        ids: tuple[str, ...],
        standing_down: bool,
    ) -> None:
        key = _key(view.resource_group, view.name)
        by_id = {vm.instance_id.lower(): vm for vm in view.vms}
        wanted = [i.lower() for i in ids]
        with self._lock:
            self.deleted_ids.update((key, i) for i in wanted)
        requested = {vm.lower() for vm in record.delete_requested}
        if (
            record.state not in (op.State.SCALING_IN, op.State.ROLLING_BACK)
            or not set(wanted) <= requested
        ):
            self.violate(
                3, f"{where}: delete of {', '.join(ids)} not recorded first (state {record.state})"
            )
        baseline = {vm.lower() for vm in record.baseline.instance_ids}
        sources = {vm.lower() for vm in record.sources}
        present = [by_id[i] for i in wanted if i in by_id and _alive(by_id[i])]
        for vm in present:
            if vm.protect_from_scale_in or vm.protect_from_scale_set_actions:
                role = "a source" if vm.instance_id.lower() in sources else "a new VM"
                if vm.instance_id.lower() in baseline and vm.instance_id.lower() not in sources:
                    role = "an original VM"
                self.violate(
                    2,
                    f"{where}: {vm.instance_id} ({role}, {record.state} operation "
                    f"{record.operation_id}) is protected (scale-in "
                    f"{vm.protect_from_scale_in}, scale set actions "
                    f"{vm.protect_from_scale_set_actions})",
                )
            if vm.instance_id.lower() in baseline and vm.instance_id.lower() not in sources:
                self.violate(6, f"{where}: {vm.instance_id} was neither created nor chosen")
            if (
                standing_down
                and vm.instance_id.lower() in baseline
                and (vm.instance_id.lower() not in requested)
            ):
                self.violate(6, f"{where}: deletes {vm.instance_id} of an opted-out set")
        doomed = [vm for vm in present if vm.instance_id.lower() in baseline]
        if doomed:
            self._check_replacements(where, view, record, doomed, wanted)
        healthy_now = sum(1 for vm in view.vms if _healthy(vm))
        lost = sum(1 for vm in present if _healthy(vm))
        touched = self.outside_touched.get(key, set()) & baseline
        floor = record.baseline.healthy - len(touched)
        if lost and healthy_now - lost < floor:
            self.violate(
                5,
                f"{where}: {healthy_now} healthy, deleting {lost} healthy leaves "
                f"{healthy_now - lost} < {floor} at the start of {record.operation_id}",
            )

    def _check_replacements(
        self,
        where: str,
        view: ScaleSetView,
        record: op.OperationRecord,
        doomed: list[VmView],
        wanted: list[str],
    ) -> None:
        """Each deleted source stands against a distinct kept new VM, a healthy one for a
        healthy source; an unhealthy replacement only once the health deadline has passed."""
        by_id = {vm.instance_id.lower(): vm for vm in view.vms}
        with self._lock:
            earlier = self._sources_deleted.setdefault(record.operation_id, {})
            for vm in doomed:
                earlier[vm.instance_id.lower()] = _healthy(vm)
            deleted = dict(earlier)
        replacements = [
            by_id[vm.lower()]
            for vm in record.kept
            if vm.lower() in by_id and _alive(by_id[vm.lower()]) and vm.lower() not in wanted
        ]
        healthy_replacements = sum(1 for vm in replacements if _healthy(vm))
        healthy_sources = sum(1 for healthy in deleted.values() if healthy)
        names = ", ".join(sorted(deleted))
        if len(deleted) > len(replacements):
            self.violate(
                1,
                f"{where}: sources {names} deleted with only {len(replacements)} new VM(s) "
                f"present ({', '.join(vm.instance_id for vm in replacements) or 'none'})",
            )
        elif healthy_sources > healthy_replacements:
            self.violate(
                1,
                f"{where}: {healthy_sources} healthy source(s) ({names}) deleted but only "
                f"{healthy_replacements} healthy new VM(s)",
            )
        elif len(deleted) > healthy_replacements and not _past(
            record.health_deadline, self.sim.clock.now()
        ):
            self.violate(
                1,
                f"{where}: sources {names} deleted while a new VM is not healthy and the "
                f"health deadline ({record.health_deadline}) has not passed",
            )

    # -- after every step -----------------------------------------------------------------

    def after_step(self, views: dict[str, ScaleSetView]) -> None:
        self._check_request_log()
        try:
            rows = self.observer.active_operations()
            slots = slots_in_use(self.observer)
        except StoreError:
            self.unverified += 1
            return
        records: dict[str, op.OperationRecord] = {}
        for row in rows:
            try:
                record = op.OperationRecord.from_json(row.body)
            except ValueError as error:
                self.violate(7, f"operation {row.operation_id}: {error}")
                continue
            records[record.scale_set_key] = record
        limit = self.settings.max_concurrent_operations
        if len(rows) > limit or len(slots) > limit:
            self.violate(4, f"{len(rows)} operations in flight, {len(slots)} slots, limit {limit}")
        if len(records) != len(rows):
            self.violate(4, f"{len(rows)} in-flight rows for {len(records)} scale sets")
        self._check_tracked(views, records)

    def _check_tracked(
        self, views: dict[str, ScaleSetView], records: dict[str, op.OperationRecord]
    ) -> None:
        for key, created in self.app_created.items():
            view = views.get(key)
            if view is None:
                continue
            alive = {vm.instance_id.lower() for vm in view.vms} & created
            untracked = {vm for vm in alive if (key, vm) not in self.tracked}
            if not untracked:
                continue
            ref = ScaleSetRef.parse(view.id)
            active = records.get(ref.key)
            if active is not None:
                baseline = {vm.lower() for vm in active.baseline.instance_ids}
                untracked = {vm for vm in untracked if vm in baseline}
            if untracked:
                untracked -= self._in_history(key, ref)
            for vm in sorted(untracked - self._orphans):
                self._orphans.add(vm)  # reported once, though it stays an orphan every step
                self.violate(3, f"{view.name}: VM {vm} created by the app is in no operation")

    def _in_history(self, key: str, ref: ScaleSetRef) -> set[str]:
        try:
            rows = self.observer.history(ref.key, limit=100)
        except StoreError:
            self.unverified += 1
            return set(self.app_created.get(key, set()))
        found: set[str] = set()
        for row in rows:
            try:
                record = op.OperationRecord.from_json(row.body)
            except ValueError as error:
                self.violate(7, f"operation {row.operation_id} in history: {error}")
                continue
            found.update(vm.lower() for vm in record.created)
        self.tracked.update((key, vm) for vm in found)
        return found

    def _check_request_log(self) -> None:
        """Every write by the app is a capacity PATCH or an instance delete in scope, and
        every id it deleted went through the write hook."""
        log = self.sim.requests
        new, self._log_seen = log[self._log_seen :], len(log)
        app = self.settings.app_principal_id
        for entry in new:
            if entry.principal_id != app or entry.method not in ("PUT", "PATCH", "POST", "DELETE"):
                continue
            parts = entry.path.split("/")
            lowered = [p.lower() for p in parts]
            try:
                rg = parts[lowered.index("resourcegroups") + 1]
                name = parts[lowered.index("virtualmachinescalesets") + 1]
            except (ValueError, IndexError):
                self.violate(6, f"unexpected write {entry.method} {entry.path}")
                continue
            if not self.in_scope(rg):
                self.violate(6, f"{entry.method} {entry.path}: outside the configured scope")
            if entry.operation == "vmss.update":
                continue
            if entry.operation != "vmss.delete_instances":
                self.violate(6, f"unexpected write {entry.operation}: {entry.path}")
                continue
            body = entry.body if isinstance(entry.body, dict) else {}
            for vm in body.get("instanceIds") or ():
                if (_key(rg, name), str(vm).lower()) not in self.deleted_ids:
                    self.violate(6, f"{name}: {vm} deleted without passing the checks")

    # -- at the end -----------------------------------------------------------------------

    def at_end(self) -> None:
        """Every scale set with nothing in flight is handed back at its owners' capacity."""
        records: list[op.OperationRecord] = []
        try:
            for scale_set_id in self.start_capacity:
                for row in self.observer.history(scale_set_id, limit=100):
                    try:
                        records.append(op.OperationRecord.from_json(row.body))
                    except ValueError:
                        continue  # reported as rule 7
        except StoreError:
            self.unverified += 1
            return
        accounts = owners_capacity(
            self.sim,
            self.start_capacity,
            records,
            journal_offset=self.journal_offsets[0],
            capacity_offset=self.journal_offsets[1],
        )
        for account in accounts:
            if not account.in_flight and account.actual != account.expected:
                self.violate(11, account.describe())


def _tag(view: ScaleSetView, name: str) -> str | None:
    for key, value in view.tags.items():
        if key.lower() == name.lower():
            return value
    return None


def _past(deadline: datetime | None, now: datetime) -> bool:
    return deadline is not None and now >= deadline


def describe_all(violations: Iterable[Violation]) -> list[str]:
    return [v.describe() for v in violations]
