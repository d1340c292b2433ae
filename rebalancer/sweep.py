"""The subscription audit as a sweep that may span several invocations (pure: no I/O).

An invocation has a time limit (`host.json` `functionTimeout`), and auditing a large
subscription within the app's share of Compute's throttling budget can take longer than one.
So the audit is a *pass* over the scale sets in a fixed ring order (their keys, sorted), done
a page at a time, with a checkpoint after every page: the key of the last scale set done. A
slice that runs out of time stops between pages and sends a `Continuation` on the follow-up
queue, so the next slice starts at once rather than at the next timer tick; should that
message be lost or the invocation crash, the next timer tick continues after the checkpoint,
so a crash loses at most the page in hand.

The ring turns: each pass starts where the previous one ended (`origin`), so a pass that
never completes (a subscription too large for the interval, or ticks spent on in-flight
operations) still reaches every scale set in turn, and none waits behind the others.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

SCHEMA = 1


@dataclass(frozen=True, slots=True)
class Sweep:
    """Where the audit stands: the pass in progress (or the last one, once `done`)."""

    started_at: datetime | None = None
    """When the current (or last) pass began; None before the first pass."""
    origin: str | None = None
    """The pass covers the ring starting after this key (None: from the first key)."""
    cursor: str | None = None
    """The last key done in this pass (None: nothing yet)."""
    done: bool = True
    finished_at: datetime | None = None
    slices: int = 0
    """Invocations that worked on this pass."""
    assessed: int = 0
    imbalanced: int = 0
    not_assessed: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Scale sets of this pass not assessed, by reason (`deferred`, `gone`, ...)."""

    # -- decisions ------------------------------------------------------------------------

    def due(self, now: datetime, interval: timedelta) -> bool:
        """A pass in progress always continues; a new one starts an interval after the last
        one started."""
        if not self.done or self.started_at is None:
            return True
        return self.started_at + interval <= now

    def begin(self, now: datetime) -> Sweep:
        """A new pass, starting where the last one ended (the ring turns)."""
        return Sweep(started_at=now, origin=self.cursor, cursor=None, done=False)

    def remaining(self, keys: Iterable[str]) -> list[str]:
        """The keys this pass has yet to do, in ring order: those after `origin` first, then
        from the start of the ring up to it; without those at or before `cursor`."""

        def rank(key: str) -> tuple[int, str]:
            return (0 if self.origin is None or key > self.origin else 1, key)

        ordered = sorted(set(keys), key=rank)
        if self.cursor is None:
            return ordered
        done = rank(self.cursor)
        return [key for key in ordered if rank(key) > done]

    def after_page(
        self, last_key: str, assessed: int, imbalanced: int, not_assessed: Mapping[str, int]
    ) -> Sweep:
        counts = dict(self.not_assessed)
        for reason, count in not_assessed.items():
            counts[reason] = counts.get(reason, 0) + count
        return replace(
            self,
            cursor=last_key,
            assessed=self.assessed + assessed,
            imbalanced=self.imbalanced + imbalanced,
            not_assessed=MappingProxyType(counts),
        )

    def finish(self, now: datetime) -> Sweep:
        return replace(self, done=True, finished_at=now)

    def sliced(self) -> Sweep:
        return replace(self, slices=self.slices + 1)

    def continued_by(self, message: Continuation) -> bool:
        """Whether `message` is the one continuation of this pass: sent after its last slice.
        A copy delivered twice, or one overtaken by a timer tick's slice, is not."""
        same_pass = self.started_at == message.started_at
        return not self.done and same_pass and self.slices == message.slices

    def continuation(self, now: datetime) -> Continuation:
        """The message that continues this pass at `now`."""
        assert self.started_at is not None, "a pass in progress has a start"
        return Continuation(self.started_at, self.slices, now)

    def duration(self) -> timedelta | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    # -- storage --------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema": SCHEMA,
                "startedAt": _iso(self.started_at),
                "origin": self.origin,
                "cursor": self.cursor,
                "done": self.done,
                "finishedAt": _iso(self.finished_at),
                "slices": self.slices,
                "assessed": self.assessed,
                "imbalanced": self.imbalanced,
                "notAssessed": dict(self.not_assessed),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Sweep:
        """The stored sweep; ValueError naming what is wrong (the caller starts a new pass)."""
        try:
            data: Any = json.loads(text)
            if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                raise ValueError(f"expected schema {SCHEMA}, got {data!r:.80}")
            return cls(
                started_at=_time(data.get("startedAt")),
                origin=data.get("origin"),
                cursor=data.get("cursor"),
                done=bool(data.get("done", True)),
                finished_at=_time(data.get("finishedAt")),
                slices=int(data.get("slices", 0)),
                assessed=int(data.get("assessed", 0)),
                imbalanced=int(data.get("imbalanced", 0)),
                not_assessed=MappingProxyType(
                    {str(k): int(v) for k, v in dict(data.get("notAssessed") or {}).items()}
                ),
            )
        except (TypeError, AttributeError, ValueError) as error:
            raise ValueError(
                f"unreadable audit checkpoint: {error}; the next pass starts from the beginning"
            ) from None


@dataclass(frozen=True, slots=True)
class Continuation:
    """A follow-up queue message: continue the pass begun at `started_at` after its slice
    number `slices`, at `due`. Only the latest one of a pass does anything (`continued_by`),
    so a redelivered copy never splits the chain and an idle audit sends none."""

    started_at: datetime
    slices: int
    due: datetime

    @property
    def label(self) -> str:
        return f"continuation of the audit pass begun {self.started_at.isoformat()}"

    def to_json(self) -> str:
        return json.dumps(
            {
                "auditPass": self.started_at.isoformat(),
                "slices": self.slices,
                "due": self.due.isoformat(),
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @staticmethod
    def names(text: str) -> bool:
        """Whether a follow-up queue message is an audit continuation (not an operation's)."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return False
        return isinstance(doc, dict) and "auditPass" in doc

    @classmethod
    def from_json(cls, text: str) -> Continuation:
        """Raises ValueError naming what is wrong."""
        try:
            doc: Any = json.loads(text)
            if not isinstance(doc, dict):
                raise ValueError(f"a {type(doc).__name__}, not an object")
            missing = [name for name in ("auditPass", "slices", "due") if name not in doc]
            if missing:
                raise ValueError(f"lacks {', '.join(missing)}")
            started_at, due = _time(doc["auditPass"]), _time(doc["due"])
            if started_at is None or due is None:
                raise ValueError("auditPass and due must be timestamps")
            return cls(started_at, int(doc["slices"]), due)
        except (TypeError, ValueError) as error:
            raise ValueError(f"unreadable audit continuation: {error}: {text[:200]!r}") from None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone")
    return moment


def pages(keys: list[str], size: int) -> list[list[str]]:
    if size < 1:
        raise ValueError(f"audit page size must be >= 1, got {size}")
    return [keys[i : i + size] for i in range(0, len(keys), size)]
