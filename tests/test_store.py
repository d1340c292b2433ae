"""The Table Storage adapter against Azurite, through the real azure-data-tables client."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devkit.azurite import (
    Azurite,
    AzuriteError,
    connection_string,
    find_executable,
    free_port,
)
from devkit.tables import (
    claim_slot,
    create_tables,
    forget_event,
    lock_holder,
    save_operation,
    slots_in_use,
    table_names,
)
from rebalancer.evaluator import assess
from rebalancer.model import (
    Health,
    HealthMonitoring,
    Instance,
    Inventory,
    OrchestrationMode,
    OutsideActivity,
    OutsideChange,
    PowerState,
    ScaleSet,
    ScaleSetRef,
)
from rebalancer.operation import OperationPolicy, OperationRecord, start
from rebalancer.store import (
    MAX_ENTITY_BYTES,
    BackoffPolicy,
    ConcurrencyError,
    EntityTooLarge,
    LockLost,
    OperationRow,
    StorageConnection,
    Store,
    StoreConfigError,
    StoreError,
    StoreStats,
    StoreUnavailable,
    encode_key,
    entity_size,
    open_store,
    parse_connection,
    split_text,
)

pytest_plugins = ["tests.azurite"]

pytestmark = pytest.mark.integration

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
SETS = "/subscriptions/sub/resourcegroups/rg-a/providers/microsoft.compute/virtualmachinescalesets"
WEB = f"{SETS}/web"
API = f"{SETS}/api"


def operation(
    operation_id: str = "op-1",
    scale_set_key: str = WEB,
    state: str = "planned",
    *,
    at: datetime = T0,
    body: str = '{"state": "planned"}',
) -> OperationRow:
    return OperationRow(operation_id, scale_set_key, state, True, at, body)


def race(count: int, action: Callable[[int], object]) -> list[object]:
    """Run `action(i)` in `count` threads released together; return results in order."""
    barrier = threading.Barrier(count, timeout=10)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = action(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a racing thread hung"
    assert not errors, errors
    return results


# -- the launcher --------------------------------------------------------------------------


def test_on_disk_azurite_keeps_rows_across_a_restart(azurite_on_disk: Azurite, store_factory):
    store = store_factory(server=azurite_on_disk)
    assert store.try_acquire(WEB, "a", T0, LEASE) is not None
    port = azurite_on_disk.port
    azurite_on_disk.restart()
    assert azurite_on_disk.port == port
    assert lock_holder(store, WEB, T0) == "a"


def test_in_memory_azurite_refuses_restart(azurite: Azurite):
    with pytest.raises(RuntimeError, match="on-disk mode"):
        azurite.restart()


def test_azurite_on_a_taken_port_fails_with_its_output():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = Azurite(port=taken.getsockname()[1], startup_timeout=15)
        with pytest.raises(AzuriteError, match="exited with code"):
            server.start()
    assert not server.running


def test_a_missing_azurite_says_how_to_install_it(tmp_path, monkeypatch):
    with pytest.raises(AzuriteError, match="make setup"):
        Azurite(executable=tmp_path / "azurite-table").start()
    monkeypatch.setenv("AZURITE_TABLE", str(tmp_path / "nowhere"))
    with pytest.raises(AzuriteError, match="AZURITE_TABLE"):
        find_executable()


def test_azurite_runs_standalone_until_interrupted(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "devkit.azurite", "--location", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        start_new_session=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("AzureWebJobsStorage=DefaultEndpointsProtocol=http;")
        connection = StorageConnection("cli", connection_string=line.split("=", 1)[1].strip())
        with Store(connection, table_prefix="cli", retry_total=0) as store:
            assert store.first_delivery("e1", T0)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0  # Azurite saves its database on the way out
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        process.stdout.close()


# -- locks ---------------------------------------------------------------------------------


def test_lock_is_exclusive_until_its_lease_expires(store: Store):
    held = store.try_acquire(WEB, "alice", T0, LEASE)
    assert held is not None and held.owner == "alice"
    assert held.lease_until == T0 + LEASE
    assert store.try_acquire(WEB, "bob", T0 + timedelta(minutes=4), LEASE) is None
    assert lock_holder(store, WEB, T0 + timedelta(minutes=4)) == "alice"

    # alice crashed: her lease runs out and bob takes over
    later = T0 + LEASE + timedelta(seconds=1)
    assert lock_holder(store, WEB, later) is None
    taken = store.try_acquire(WEB, "bob", later, LEASE)
    assert taken is not None and taken.owner == "bob"
    with pytest.raises(LockLost, match="no longer held by alice"):
        store.renew(held, later)
    assert store.release(held) is False
    assert lock_holder(store, WEB, later) == "bob"


def test_lock_renew_and_release(store: Store):
    held = store.try_acquire(WEB, "alice", T0, LEASE)
    assert held is not None
    renewed = store.renew(held, T0 + timedelta(minutes=4))
    assert renewed.lease_until == T0 + timedelta(minutes=9)
    assert renewed.etag != held.etag
    assert store.try_acquire(WEB, "bob", T0 + timedelta(minutes=8), LEASE) is None
    with pytest.raises(LockLost):
        store.renew(held, T0 + timedelta(minutes=4))  # the old ETag no longer proves anything
    assert store.release(renewed) is True
    assert store.try_acquire(WEB, "bob", T0 + timedelta(minutes=8), LEASE) is not None


def test_an_earlier_copy_of_a_renewed_lock_still_releases_it(store: Store):
    """A pass keeps the lock it acquired while its writes renew the row (new ETags)."""
    held = store.try_acquire(WEB, "pass-1", T0, LEASE)
    assert held is not None
    store.renew(held, T0 + timedelta(minutes=1))
    assert store.release(held) is True
    assert lock_holder(store, WEB, T0 + timedelta(minutes=2)) is None
    taken = store.try_acquire(WEB, "pass-2", T0 + timedelta(minutes=2), LEASE)
    assert taken is not None
    assert store.release(held) is False  # another owner's lock is never released
    assert lock_holder(store, WEB, T0 + timedelta(minutes=2)) == "pass-2"


def test_the_same_owner_reacquires_and_other_scale_sets_are_independent(store: Store):
    first = store.try_acquire(WEB, "alice", T0, LEASE)
    again = store.try_acquire(WEB, "alice", T0 + timedelta(minutes=1), LEASE)
    assert first is not None and again is not None
    assert again.acquired_at == T0 and again.lease_until == T0 + timedelta(minutes=6)
    assert store.try_acquire(API, "bob", T0, LEASE) is not None


@pytest.mark.parametrize("expired_holder", [False, True])
@pytest.mark.parametrize("shared", [False, True], ids=["instances", "threads"])
def test_eight_concurrent_acquirers_exactly_one_wins(store_factory, expired_holder, shared):
    # eight function instances (own clients), or eight threads sharing one Store
    stores = [store_factory()] * 8 if shared else [store_factory() for _ in range(8)]
    now = T0
    if expired_holder:  # the contended path is the takeover of a crashed holder's lease
        assert stores[0].try_acquire(WEB, "crashed", T0 - timedelta(hours=1), LEASE)
    results = race(8, lambda i: stores[i].try_acquire(WEB, f"owner-{i}", now, LEASE))
    winners = [lock for lock in results if lock is not None]
    assert len(winners) == 1
    assert lock_holder(stores[0], WEB, now) == winners[0].owner


# -- operations ----------------------------------------------------------------------------


def test_operation_create_read_update_and_stale_etag(store: Store):
    created = save_operation(store, operation())
    assert created.etag is not None and created.created_at == T0
    assert store.active_operation(WEB) == created
    assert store.active_operation(API) is None

    moved = save_operation(
        store, replace(created, state="scaling_out", updated_at=T0 + timedelta(minutes=1))
    )
    assert store.active_operation(WEB) == moved
    with pytest.raises(ConcurrencyError, match="stale ETag"):
        save_operation(store, replace(created, state="failed"))  # written from an old read
    assert store.active_operation(WEB) == moved


def test_a_scale_set_has_at_most_one_in_flight_operation(store: Store):
    save_operation(store, operation("op-1"))
    with pytest.raises(ConcurrencyError, match="already has an in-flight operation"):
        save_operation(store, operation("op-2"))


def test_commit_writes_the_operation_only_while_the_lock_is_held(store: Store):
    lock = store.try_acquire(WEB, "alice", T0, LEASE)
    assert lock is not None
    row, lock = store.commit(operation(), lock, T0 + timedelta(minutes=1))
    assert lock.lease_until == T0 + timedelta(minutes=6)
    assert lock_holder(store, WEB, T0 + timedelta(minutes=5, seconds=30)) == "alice"

    # alice stalls past her lease; bob takes the scale set over
    late = T0 + timedelta(minutes=10)
    assert store.try_acquire(WEB, "bob", late, LEASE) is not None
    with pytest.raises(LockLost):
        store.commit(replace(row, state="scaling_out"), lock, late)
    assert store.active_operation(WEB) == row  # nothing was written


def test_commit_rejects_a_stale_operation_even_with_the_lock(store: Store):
    lock = store.try_acquire(WEB, "alice", T0, LEASE)
    assert lock is not None
    row, lock = store.commit(operation(), lock, T0)
    save_operation(store, replace(row, state="scaling_out"))
    with pytest.raises(ConcurrencyError) as raised:
        store.commit(replace(row, state="failed"), lock, T0)
    assert not isinstance(raised.value, LockLost)
    assert store.renew(lock, T0).owner == "alice"  # the lock row was not touched


def test_active_operations_lists_only_in_flight_ones(store: Store):
    assert store.active_operations() == []  # tables do not exist yet: nothing in flight
    web = save_operation(store, operation("op-web", WEB))
    api = save_operation(store, operation("op-api", API))
    lock = store.try_acquire(WEB, "alice", T0, LEASE)
    assert lock is not None
    claim_slot(store, "op-web", 5, T0)
    assert {row.operation_id for row in store.active_operations()} == {"op-web", "op-api"}
    save_operation(store, replace(api, state="succeeded", active=False))
    assert store.active_operations() == [web]


def test_finished_operations_move_to_history_newest_first(store: Store):
    ids = []
    for day in range(4):
        started = T0 + timedelta(days=day)
        row = save_operation(store, operation(f"op-{day}", at=started))
        save_operation(
            store,
            replace(row, state="succeeded", active=False, updated_at=started + timedelta(hours=1)),
        )
        ids.append(f"op-{day}")
    current = save_operation(store, operation("op-now", at=T0 + timedelta(days=9)))
    assert store.active_operation(WEB) == current

    history = store.history(WEB, limit=3)
    assert [row.operation_id for row in history] == ["op-now", "op-3", "op-2"]
    assert [row.active for row in history] == [True, False, False]
    assert history[1].state == "succeeded"
    assert [row.operation_id for row in store.history(WEB)] == ["op-now", *reversed(ids)]
    assert store.history(API) == []


def test_a_finished_operation_can_still_be_amended(store: Store):
    row = save_operation(store, operation())
    done = save_operation(store, replace(row, state="succeeded", active=False))
    amended = save_operation(store, replace(done, body='{"note": "call ids appended"}'))
    assert store.history(WEB)[0] == amended
    with pytest.raises(ConcurrencyError):
        save_operation(store, replace(done, body="stale"))


def test_interrupted_archiving_is_completed(store: Store):
    row = save_operation(store, operation("op-1"))
    assert claim_slot(store, "op-1", 3, T0)
    # A crash right after the terminal write: the finished row is still in the live partition.
    finished = replace(row, state="failed", active=False)
    store._tables["live"].update_entity(store._operation_entity(finished))
    assert store.active_operations() == []
    assert store.active_operation(WEB) is None  # completes the move
    assert slots_in_use(store) == []
    assert [r.operation_id for r in store.history(WEB)] == ["op-1"]
    assert save_operation(store, operation("op-2")).operation_id == "op-2"


def test_purge_removes_finished_operations_past_retention(store: Store):
    for day in range(3):
        at = T0 + timedelta(days=day)
        row = save_operation(store, operation(f"op-{day}", at=at))
        save_operation(store, replace(row, state="succeeded", active=False))
    save_operation(store, operation("op-live", at=T0))
    result = store.purge(T0 + timedelta(days=31, hours=12), history_retention=timedelta(days=30))
    assert result.operations == 2
    assert [row.operation_id for row in store.history(WEB)] == ["op-live", "op-2"]


def test_large_bodies_are_split_and_oversized_ones_refused(store: Store):
    body = ('{"baseline": [' + ",".join(f'"{i}"' for i in range(9000)) + "]}") + "\U0001f600" * 9
    assert len(body) > 60_000
    row = save_operation(store, operation(body=body))
    assert store.active_operation(WEB) == row
    assert store.active_operation(WEB).body == body

    too_big = "x" * (MAX_ENTITY_BYTES // 2)
    with pytest.raises(EntityTooLarge, match="at most 1,048,576"):
        save_operation(store, operation("op-2", API, body=too_big))
    assert store.active_operation(API) is None


def real_record(vms_per_zone: tuple[int, int, int], operation_id: str = "op-real"):
    """An operation record from the real evaluator and state machine (not a stand-in)."""
    ref = ScaleSetRef("00000000-0000-0000-0000-000000000001", "RG-Web", "vmss-web")
    instances = []
    for zone, count in zip(("1", "2", "3"), vms_per_zone, strict=True):
        for _ in range(count):
            number = len(instances)
            instances.append(
                Instance(
                    id=str(number),
                    name=f"vmss-web_{number}",
                    zone=zone,
                    provisioning_state="Succeeded",
                    power_state=PowerState.RUNNING,
                    health=Health.HEALTHY,
                )
            )
    scale_set = ScaleSet(
        ref=ref,
        location="westeurope",
        zones=("1", "2", "3"),
        sku_name="Standard_D2s_v5",
        capacity=len(instances),
        mode=OrchestrationMode.UNIFORM,
        provisioning_state="Succeeded",
        health_monitoring=HealthMonitoring.EXTENSION,
        platform_rebalancing=False,
    )
    inventory = Inventory(scale_set, tuple(instances), T0)
    record, _ = start(inventory, assess(inventory), OperationPolicy(), T0, operation_id)
    return record


def test_a_real_operation_record_of_a_1000_vm_scale_set_round_trips(store: Store):
    record = real_record((300, 350, 350))
    assert record.active and record.scale_set_key == record.ref.key
    saved = save_operation(store, OperationRow.of(record))
    assert saved.state == "scaling_out" and saved.created_at == T0
    [listed] = store.active_operations()
    assert OperationRecord.from_json(listed.body) == record
    assert store.active_operation(record.scale_set_key) == saved


def test_split_text_respects_utf16_units_and_surrogate_pairs():
    text = "ab\U0001f600cd\U0001f600"  # each emoji is 2 UTF-16 code units
    pieces = split_text(text, limit=3)
    assert "".join(pieces) == text
    for piece in pieces:
        assert len(piece.encode("utf-16-le")) // 2 <= 3
    assert split_text("", limit=3) == [""]
    assert entity_size({"PartitionKey": "p", "RowKey": "r", "S": "ab"}) == 4 + 4 + 8 + 2 + 4 + 4


# -- concurrency slots ---------------------------------------------------------------------


def test_slots_cap_concurrent_operations(store: Store):
    assert claim_slot(store, "op-a", 2, T0)
    assert claim_slot(store, "op-a", 2, T0)  # idempotent
    assert claim_slot(store, "op-b", 2, T0)
    assert not claim_slot(store, "op-c", 2, T0)
    store.release_slot("op-a")
    store.release_slot("op-a")  # idempotent
    assert claim_slot(store, "op-c", 2, T0)
    assert sorted(slots_in_use(store)) == ["op-b", "op-c"]
    assert not claim_slot(store, "op-d", 0, T0)


def test_a_slot_whose_operation_is_gone_is_reclaimed_after_the_grace(store: Store):
    in_flight = save_operation(store, operation("op-a", WEB))
    assert claim_slot(store, "op-a", 2, T0)
    assert claim_slot(store, "op-b", 2, T0)  # never got an operation row (crashed)
    grace_over = T0 + store.slot_grace + timedelta(seconds=1)
    assert not claim_slot(store, "op-c", 2, T0 + timedelta(seconds=30))
    assert claim_slot(store, "op-c", 2, grace_over)
    assert sorted(slots_in_use(store)) == ["op-a", "op-c"]
    # op-a finishes without releasing its slot: it is reclaimable too
    save_operation(store, replace(in_flight, state="succeeded", active=False))
    assert claim_slot(store, "op-d", 2, grace_over)
    assert sorted(slots_in_use(store)) == ["op-c", "op-d"]


def test_eight_racing_claims_never_exceed_the_cap(store_factory):
    stores = [store_factory() for _ in range(8)]
    results = race(8, lambda i: claim_slot(stores[i], f"op-{i}", 3, T0))
    assert results.count(True) == 3
    assert len(slots_in_use(stores[0])) == 3


def test_begin_operation_writes_lock_operation_and_slot_together(store: Store):
    web_lock = store.try_acquire(WEB, "alice", T0, LEASE)
    api_lock = store.try_acquire(API, "bob", T0, LEASE)
    assert web_lock is not None and api_lock is not None
    started = store.begin_operation(operation("op-web", WEB), web_lock, T0, slot_limit=1)
    assert started is not None
    row, web_lock = started
    assert web_lock.lease_until == T0 + LEASE and store.renew(web_lock, T0).owner == "alice"
    assert slots_in_use(store) == ["op-web"]

    # the only slot is taken: nothing is written for the second scale set
    assert store.begin_operation(operation("op-api", API), api_lock, T0, slot_limit=1) is None
    assert store.active_operation(API) is None

    # finishing frees the slot, so the waiting scale set can start
    save_operation(store, replace(row, state="succeeded", active=False))
    assert slots_in_use(store) == []
    assert store.begin_operation(operation("op-api", API), api_lock, T0, slot_limit=1)
    assert [r.operation_id for r in store.active_operations()] == ["op-api"]


def test_begin_operation_writes_nothing_without_the_lock_or_with_one_in_flight(store: Store):
    lock = store.try_acquire(WEB, "alice", T0, LEASE)
    assert lock is not None
    late = T0 + timedelta(minutes=10)
    bob = store.try_acquire(WEB, "bob", late, LEASE)
    assert bob is not None
    with pytest.raises(LockLost):
        store.begin_operation(operation("op-1"), lock, late, slot_limit=5)
    assert store.active_operation(WEB) is None and slots_in_use(store) == []

    started = store.begin_operation(operation("op-1"), bob, late, slot_limit=5)
    assert started is not None
    with pytest.raises(ConcurrencyError, match="already has an in-flight operation"):
        store.begin_operation(operation("op-2"), started[1], late, slot_limit=5)
    assert slots_in_use(store) == ["op-1"]


def test_eight_scale_sets_racing_to_begin_respect_the_cap(store_factory):
    stores = [store_factory() for _ in range(8)]
    keys = [f"{SETS}/set-{i}" for i in range(8)]
    locks = [stores[i].try_acquire(keys[i], f"owner-{i}", T0, LEASE) for i in range(8)]

    def begin(i: int) -> object:
        return stores[i].begin_operation(operation(f"op-{i}", keys[i]), locks[i], T0, slot_limit=3)

    results = race(8, begin)
    assert sum(result is not None for result in results) == 3
    assert len(stores[0].active_operations()) == 3
    assert len(slots_in_use(stores[0])) == 3


# -- zone backoff --------------------------------------------------------------------------


def test_capacity_backoff_doubles_up_to_the_cap_and_clears(store: Store):
    assert store.backoff_until("westeurope", "Standard_D2s_v5", "2", T0) is None
    delays = []
    now = T0
    for _ in range(6):
        backoff = store.record_capacity_failure("westeurope", "Standard_D2s_v5", "2", now)
        delays.append(backoff.until - now)
        now = backoff.until
    minutes = [int(delay.total_seconds() // 60) for delay in delays]
    assert minutes == [15, 30, 60, 120, 240, 240]

    # shared by every scale set of that location, SKU and zone; case does not matter
    assert store.backoff_until("WestEurope", "standard_d2s_v5", "2", now - timedelta(minutes=1))
    assert (
        store.backoff_until("westeurope", "Standard_D2s_v5", "1", now - timedelta(hours=1)) is None
    )
    assert store.backoff_until("westeurope", "Standard_D2s_v5", "2", now) is None  # expired
    assert [b.zone for b in store.backoffs(now - timedelta(minutes=1))] == ["2"]

    store.clear_backoff("westeurope", "Standard_D2s_v5", "2")
    again = store.record_capacity_failure("westeurope", "Standard_D2s_v5", "2", now)
    assert again.failures == 1 and again.until - now == timedelta(minutes=15)


def test_capacity_backoff_starts_over_after_a_quiet_day(store_factory):
    policy = BackoffPolicy(base=timedelta(minutes=1), cap=timedelta(minutes=10))
    store = store_factory(backoff=policy)
    assert store.record_capacity_failure("eastus", "sku", "3", T0).failures == 1
    assert store.record_capacity_failure("eastus", "sku", "3", T0).failures == 2
    later = T0 + timedelta(days=2)
    fresh = store.record_capacity_failure("eastus", "sku", "3", later)
    assert fresh.failures == 1 and fresh.until == later + timedelta(minutes=1)
    assert BackoffPolicy().delay(1000) == timedelta(hours=4)


# -- assessments, activity, events ---------------------------------------------------------


def test_assessment_is_written_only_when_it_changed(store: Store):
    assert store.last_assessment(WEB) is None
    assert store.save_assessment(WEB, '{"balanced": false}', T0, fingerprint="unbalanced")
    before = store.stats
    for minute in range(1, 6):  # five idle ticks: same content, new timestamps
        at = T0 + timedelta(minutes=minute)
        assert not store.save_assessment(WEB, f'{{"at": "{at}"}}', at, fingerprint="unbalanced")
    idle = store.stats - before
    assert idle.writes == 0 and idle.reads == 5
    assert store.save_assessment(WEB, '{"balanced": true}', T0 + timedelta(hours=1))
    stored = store.last_assessment(WEB)
    assert stored is not None
    assert stored.body == '{"balanced": true}' and stored.at == T0 + timedelta(hours=1)
    assert not store.save_assessment(WEB, '{"balanced": true}', T0 + timedelta(hours=2))


def test_an_assessment_read_moments_ago_saves_the_read(store: Store):
    assert store.save_assessment(WEB, '{"balanced": true}', T0)
    (stored,) = store.assessment_fingerprints([WEB]).values()
    before = store.stats
    assert not store.save_assessment(WEB, '{"balanced": true}', T0, stored=stored)
    assert store.stats - before == StoreStats(0, 0)
    # Stale or different: read and written exactly as without it.
    assert store.save_assessment(WEB, '{"balanced": false}', T0, stored=stored, imbalanced=True)
    assert (store.stats - before) == StoreStats(1, 1)
    saved = store.last_assessment(WEB)
    assert saved is not None and saved.body == '{"balanced": false}'
    assert saved.imbalanced_since == T0


def test_assessment_fingerprints_are_one_query_per_ascending_run_of_keys(store: Store):
    keys = [f"{SETS}/web{i:02d}" for i in range(12)]
    for key in keys:
        store.save_assessment(key, f'{{"id": "{key}"}}', T0, fingerprint=f"fp-{key[-2:]}")
    store.record_activity(keys[4], T0)  # another row of a scale set's partition
    before = store.stats
    page = keys[3:8]
    assert store.assessment_fingerprints(page) == {key: f"fp-{key[-2:]}" for key in page}
    assert (store.stats - before).reads == 1  # rows of the range not asked for are dropped
    # A page where the audit's ring wraps around: two runs, two queries.
    before = store.stats
    wrapped = [*keys[10:], *keys[:2], f"{SETS}/x-never-assessed"]
    found = store.assessment_fingerprints(wrapped)
    assert found == {key: f"fp-{key[-2:]}" for key in [*keys[10:], *keys[:2]]}
    assert (store.stats - before).reads == 2
    assert store.assessment_fingerprints([]) == {}


def test_operation_keys_name_every_scale_set_with_an_operation_row(store: Store):
    assert store.operation_keys() == frozenset()
    save_operation(store, operation("op-1", WEB))
    row = save_operation(store, operation("op-2", API))
    # Finished, its archiving interrupted: still a row, which only `active_operation` completes.
    store._tables["live"].update_entity(store._operation_entity(replace(row, active=False)))
    assert store.try_acquire(f"{SETS}/locked", "a", T0, LEASE) is not None
    before = store.stats
    assert store.operation_keys() == {WEB, API}
    assert (store.stats - before).reads == 1


def test_outside_activity_keeps_the_latest(store: Store):
    assert store.last_activity(WEB) is None
    assert store.record_activity(WEB, T0)
    assert store.record_activity(WEB, T0 + timedelta(minutes=5))
    assert not store.record_activity(WEB, T0 + timedelta(minutes=1))  # older, out of order
    assert store.last_activity(WEB) == T0 + timedelta(minutes=5)
    assert store.last_activity(API) is None


def test_outside_activity_keeps_the_latest_of_each_kind(store: Store):
    assert store.outside_activity(WEB) == OutsideActivity()
    assert store.record_activity(WEB, T0, OutsideChange.VM_DELETE)
    # An older capacity write still counts as the latest capacity write, not as the latest.
    assert not store.record_activity(WEB, T0 - timedelta(minutes=1), OutsideChange.CAPACITY_WRITE)
    assert store.record_activity(WEB, T0 + timedelta(minutes=2))  # a kind that changes no size
    assert not store.record_activity(WEB, T0 - timedelta(minutes=5), OutsideChange.VM_DELETE)
    activity = store.outside_activity(WEB)
    assert activity == OutsideActivity(
        capacity_written_at=T0 - timedelta(minutes=1), vms_deleted_at=T0
    )
    assert store.last_activity(WEB) == T0 + timedelta(minutes=2)
    assert activity.latest_since(T0 - timedelta(minutes=3)) is OutsideChange.VM_DELETE
    assert activity.latest_since(T0 + timedelta(seconds=1)) is None


def test_event_ids_are_delivered_once_until_they_expire(store: Store):
    event = "9b2f6c57-1f0a-4c1e-9a86-5d1ad0a4a1b2"
    assert store.first_delivery(event, T0)
    assert not store.first_delivery(event, T0 + timedelta(hours=1))
    assert store.first_delivery("another", T0)
    forget_event(store, "another")  # handling failed: let Event Grid's retry through
    assert store.first_delivery("another", T0 + timedelta(minutes=1))

    after = T0 + store.event_ttl + timedelta(seconds=1)
    assert store.purge_events(after) == 1  # only the first one has expired
    assert store.first_delivery(event, after)


def test_event_seen_reads_the_mark_without_writing(store: Store):
    event = "0d3c9c1e-7e0b-4c57-9d1e-2f6a1b3c4d5e"
    before = store.stats
    assert not store.event_seen(event, T0)
    assert (store.stats - before).writes == 0
    store.first_delivery(event, T0)
    assert store.event_seen(event, T0 + timedelta(hours=1))
    assert not store.event_seen(event, T0 + store.event_ttl + timedelta(seconds=1))


def test_racing_duplicate_deliveries_are_handled_once(store_factory):
    stores = [store_factory() for _ in range(8)]
    results = race(8, lambda i: stores[i].first_delivery("same-event", T0))
    assert results.count(True) == 1


# -- errors, counters, keys ----------------------------------------------------------------


def test_unreachable_storage_raises_store_unavailable(table_prefix):
    dead = StorageConnection("test", connection_string=connection_string(free_port()))
    with Store(dead, table_prefix=table_prefix, retry_total=0) as store:
        with pytest.raises(StoreUnavailable, match="safe to retry"):
            store.active_operations()
        with pytest.raises(StoreUnavailable):
            store.try_acquire(WEB, "alice", T0, LEASE)


@contextmanager
def answering(status: int, code: str) -> Iterator[str]:
    """A loopback server answering every request with a Table error; yields its conn string."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            body = json.dumps({"odata.error": {"code": code, "message": {"value": code}}})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("x-ms-error-code", code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield connection_string(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(("status", "code"), [(503, "ServerBusy"), (500, "InternalError")])
def test_server_errors_raise_store_unavailable(table_prefix, status, code):
    with (
        answering(status, code) as conn,
        Store(
            StorageConnection("test", connection_string=conn),
            table_prefix=table_prefix,
            retry_total=0,
        ) as store,
    ):
        with pytest.raises(StoreUnavailable, match=f"HTTP {status} {code}"):
            store.active_operation(WEB)
        with pytest.raises(StoreUnavailable):
            save_operation(store, operation())


def test_access_denied_says_which_role_to_grant(table_prefix):
    with (
        answering(403, "AuthorizationPermissionMismatch") as conn,
        Store(
            StorageConnection("test", connection_string=conn),
            table_prefix=table_prefix,
            retry_total=0,
        ) as store,
    ):
        with pytest.raises(StoreError, match="Storage Table Data Contributor") as raised:
            store.active_operations()
        assert not isinstance(raised.value, StoreUnavailable)


def test_storage_going_away_mid_run_raises_store_unavailable(azurite_on_disk, store_factory):
    store = store_factory(server=azurite_on_disk)
    assert store.first_delivery("e1", T0)
    azurite_on_disk.stop()
    with pytest.raises(StoreUnavailable):
        store.first_delivery("e2", T0)
    azurite_on_disk.start()
    assert not store.first_delivery("e1", T0)  # graceful stop kept the data


def test_naive_times_are_refused(store: Store):
    with pytest.raises(ValueError, match="timezone-aware"):
        store.try_acquire(WEB, "alice", datetime(2026, 1, 1), LEASE)


def test_stats_count_requests_and_tables_are_created_once(store: Store):
    assert store.stats.reads == 0 and store.stats.writes == 0
    store.first_delivery("e1", T0)  # create fails (no table), table created, create again
    assert store.stats.writes == 3
    store.first_delivery("e2", T0)
    assert store.stats.writes == 4
    create_tables(store)  # idempotent
    assert store.stats.writes == 4 + 5


def test_keys_are_table_safe_and_distinct():
    key = encode_key(WEB)
    assert not set(key) & set("/\\#?")
    assert encode_key("a/b") != encode_key("a%2Fb")
    with pytest.raises(ValueError, match="too long"):
        encode_key("x" * 2000)


def test_table_prefix_must_make_valid_table_names(azurite):
    connection = StorageConnection("test", connection_string=azurite.connection_string)
    with pytest.raises(StoreConfigError, match="table prefix"):
        Store(connection, table_prefix="bad-prefix")


# -- connection settings -------------------------------------------------------------------


def test_connection_string_forms():
    local = parse_connection({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    assert local.connection_string == "UseDevelopmentStorage=true"
    assert not local.identity_based
    named = parse_connection(
        {"Custom": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=k"}, "Custom"
    )
    assert named.connection_string is not None and "AccountKey=k" not in repr(named)
    with pytest.raises(StoreConfigError, match="not a storage connection string"):
        parse_connection({"AzureWebJobsStorage": "myaccount"})


def test_identity_based_forms():
    system = parse_connection(
        {
            "AzureWebJobsStorage__tableServiceUri": "https://acct.table.core.windows.net/",
            "AzureWebJobsStorage__credential": "managedidentity",
        }
    )
    assert system.table_service_uri == "https://acct.table.core.windows.net"
    assert system.managed_identity and system.client_id is None
    user = parse_connection(
        {
            "AzureWebJobsStorage__accountName": "acct",
            "AzureWebJobsStorage__credential": "ManagedIdentity",
            "AzureWebJobsStorage__clientId": "11111111-2222-3333-4444-555555555555",
        }
    )
    assert user.table_service_uri == "https://acct.table.core.windows.net"
    assert user.client_id == "11111111-2222-3333-4444-555555555555"
    default = parse_connection({"azurewebjobsstorage__TABLESERVICEURI": "https://x.example"})
    assert default.identity_based and not default.managed_identity


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no storage connection: set AzureWebJobsStorage"),
        ({"AzureWebJobsStorage": "  "}, "no storage connection"),
        ({"AzureWebJobsStorage__tableServiceUri": "http://acct.table"}, "must start with https"),
        ({"AzureWebJobsStorage__accountName": "Bad_Name"}, "not a storage account name"),
        (
            {
                "AzureWebJobsStorage__tableServiceUri": "https://a.table.core.windows.net",
                "AzureWebJobsStorage__credential": "secret",
            },
            "only|not supported",
        ),
    ],
)
def test_bad_connection_settings_name_the_setting(env, message):
    with pytest.raises(StoreConfigError, match=message):
        parse_connection(env)


def test_open_store_with_a_connection_string_reaches_azurite(azurite, table_prefix):
    env = {"AzureWebJobsStorage": azurite.connection_string}
    with open_store(env, table_prefix=table_prefix, retry_total=0) as store:
        assert store.first_delivery("e1", T0)
        assert table_names(store)[0] == f"{table_prefix}live"


def test_open_store_builds_identity_clients_without_network():
    env = {
        "AzureWebJobsStorage__tableServiceUri": "https://acct.table.core.windows.net",
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": "11111111-2222-3333-4444-555555555555",
    }
    with open_store(env) as store:
        assert store._service.url.startswith("https://acct.table.core.windows.net")
        assert type(store._service.credential).__name__ == "ManagedIdentityCredential"
    local = open_store({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    assert "127.0.0.1:10002" in local._service.url
    local.close()
    assert isinstance(StoreUnavailable("x"), StoreError)


def test_the_app_builds_one_credential_for_storage_compute_and_notifications(monkeypatch):
    """The deployed wiring (infra/modules/app.bicep): Table Storage through the user-assigned
    identity that AZURE_CLIENT_ID names too. Compute and Event Grid reuse the store's
    credential instead of building a DefaultAzureCredential each on first use."""
    from rebalancer.compute.credentials import DeferredCredential
    from rebalancer.service import runtime_from_settings

    client_id = "11111111-2222-3333-4444-555555555555"
    for name in ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AZURE_FEDERATED_TOKEN_FILE", raising=False)
    monkeypatch.setenv("AZURE_CLIENT_ID", client_id)
    env = {
        "REBALANCER_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000",
        "REBALANCER_NOTIFY_TOPIC_ENDPOINT": "https://t.westeurope-1.eventgrid.azure.net/api/events",
        "AzureWebJobsStorage__tableServiceUri": "https://acct.table.core.windows.net",
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": client_id,
        "AZURE_CLIENT_ID": client_id,
    }
    runtime = runtime_from_settings(env)
    credential = runtime.store._service.credential
    assert type(credential).__name__ == "ManagedIdentityCredential"
    assert runtime.reconciler.compute._credential is credential
    assert runtime.reconciler.on_notify.credential is credential
    runtime.store.close()

    # Another identity for storage, or a service principal that DefaultAzureCredential would
    # take first: Compute and Event Grid share one credential of their own, built on first use.
    for other in (
        {"AzureWebJobsStorage__clientId": "99999999-2222-3333-4444-555555555555"},
        {"AZURE_CLIENT_SECRET": "from-the-environment"},
    ):
        separate = runtime_from_settings({**env, **other})
        shared = separate.reconciler.compute._credential
        assert isinstance(shared, DeferredCredential) and not shared.built
        assert separate.reconciler.on_notify.credential is shared
        assert shared is not separate.store._service.credential
        separate.store.close()


def test_imbalanced_since_survives_detail_changes_and_ends_when_balanced(store: Store):
    assert store.save_assessment(WEB, '{"detail": "cooldown 1"}', T0, imbalanced=True)
    later = T0 + timedelta(minutes=20)
    assert store.save_assessment(WEB, '{"detail": "cooldown 2"}', later, imbalanced=True)
    stored = store.last_assessment(WEB)
    assert stored is not None and stored.at == later and stored.imbalanced_since == T0
    assert store.save_assessment(WEB, '{"balanced": true}', T0 + timedelta(hours=1))
    assert store.last_assessment(WEB).imbalanced_since is None
    again = T0 + timedelta(hours=2)
    assert store.save_assessment(WEB, '{"detail": "zone_backoff"}', again, imbalanced=True)
    assert store.last_assessment(WEB).imbalanced_since == again
