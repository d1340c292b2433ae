"""The audit's ring (pure): order, checkpoint, turning, and what is stored."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rebalancer.sweep import Continuation, Sweep, pages

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
KEYS = [f"/subscriptions/s/resourcegroups/rg/providers/x/vmss{i:02d}" for i in range(10)]


def test_a_pass_continues_after_its_checkpoint():
    sweep = Sweep().begin(T0)
    assert sweep.remaining(KEYS) == KEYS
    sweep = sweep.after_page(KEYS[3], 4, 1, {})
    assert sweep.remaining(KEYS) == KEYS[4:]
    assert (sweep.assessed, sweep.imbalanced, sweep.done) == (4, 1, False)


def test_the_next_pass_starts_where_the_last_one_ended():
    sweep = Sweep(cursor=KEYS[5]).begin(T0)  # the last pass ended at vmss05
    assert sweep.origin == KEYS[5]
    sweep = sweep.after_page(KEYS[8], 3, 0, {})
    assert sweep.remaining(KEYS) == [KEYS[9], *KEYS[:6]]
    turned = sweep.after_page(KEYS[2], 3, 0, {}).finish(T0).begin(T0 + timedelta(hours=1))
    assert turned.origin == KEYS[2]
    assert turned.remaining(KEYS) == [*KEYS[3:], *KEYS[:3]]


def test_only_the_latest_continuation_of_a_pass_continues_it():
    sweep = Sweep().begin(T0).sliced().after_page(KEYS[4], 5, 0, {})
    sent = sweep.continuation(T0 + timedelta(minutes=9))
    assert sent == Continuation(T0, 1, T0 + timedelta(minutes=9))
    assert sweep.continued_by(sent)
    overtaken = sweep.sliced()  # a timer tick's slice ran meanwhile
    assert not overtaken.continued_by(sent)
    assert overtaken.continued_by(overtaken.continuation(T0))
    assert not sweep.finish(T0).continued_by(sent), "a pass that is done is not continued"
    next_pass = sweep.finish(T0).begin(T0 + timedelta(hours=1)).sliced()
    assert not next_pass.continued_by(sent), "nor is the next pass by an old message"


def test_scale_sets_that_come_and_go_take_their_place_in_the_ring():
    sweep = Sweep().begin(T0).after_page(KEYS[4], 5, 0, {})
    added = KEYS[2][:-2] + "02a"  # sorts after vmss02: behind the checkpoint, next pass
    later = KEYS[6] + "b"
    assert sweep.remaining([*KEYS[:6], added, later]) == [KEYS[5], later]


@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=30, unique=True))
def test_every_key_once_per_pass_from_any_origin(keys):
    for origin in [None, *keys]:
        sweep = Sweep(cursor=origin).begin(T0)
        seen = []
        while remaining := sweep.remaining(keys):
            page = remaining[:3]
            seen += page
            sweep = sweep.after_page(page[-1], len(page), 0, {})
        assert sorted(seen) == sorted(keys)


def test_due_continues_a_pass_and_spaces_new_ones():
    interval = timedelta(minutes=60)
    assert Sweep().due(T0, interval)
    running = Sweep().begin(T0)
    assert running.due(T0, interval)
    done = running.finish(T0 + timedelta(minutes=40))
    assert not done.due(T0 + timedelta(minutes=59), interval)
    assert done.due(T0 + timedelta(minutes=60), interval)
    assert done.duration() == timedelta(minutes=40)


def test_the_checkpoint_survives_its_json():
    sweep = Sweep(cursor=KEYS[1]).begin(T0).sliced().after_page(KEYS[3], 2, 1, {"deferred": 1})
    assert Sweep.from_json(sweep.to_json()) == sweep


@pytest.mark.parametrize("text", ["", "[]", '{"schema": 2}', '{"schema": 1, "startedAt": "x"}'])
def test_an_unreadable_checkpoint_is_a_clear_error(text):
    with pytest.raises(ValueError, match=r"^unreadable audit checkpoint: "):
        Sweep.from_json(text)


def test_pages():
    assert pages(KEYS[:5], 2) == [KEYS[:2], KEYS[2:4], KEYS[4:5]]
    with pytest.raises(ValueError, match="page size"):
        pages(KEYS, 0)
