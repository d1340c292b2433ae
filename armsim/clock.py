"""Clocks for the simulator: virtual time for tests, wall-clock time for the demo.

Everything in armsim that takes time (VM provisioning, health, deletes, long-running
operations, throttling refill) is scheduled against one of these. A test moves a
`VirtualClock` forward with `advance(seconds)`, so a 90-minute health timeout takes
milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

DEFAULT_START = datetime(2026, 11, 20, 9, 0, 0, tzinfo=UTC)

Listener = Callable[[datetime], None]


class _Listened:
    """Who hears about each `advance` (the simulator, to fire what has come due)."""

    _listeners: list[Listener]

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _moved(self, now: datetime) -> datetime:
        for listener in list(self._listeners):
            listener(now)
        return now


class VirtualClock(_Listened):
    """Time that moves only when told to. Thread-safe."""

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        if start.tzinfo is None:
            raise ValueError("VirtualClock start must be timezone-aware (use datetime.UTC)")
        self._now = start
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> datetime:
        """Move time forward and let the simulator catch up (timers fire, events go out)."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards ({seconds} s)")
        with self._lock:
            self._now += timedelta(seconds=seconds)
            now = self._now
        return self._moved(now)

    @property
    def virtual(self) -> bool:
        return True


class WallClock(_Listened):
    """Real time, for the demo and `python -m armsim serve`; `speed` > 1 runs faster."""

    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError(f"WallClock speed must be positive, got {speed}")
        self._speed = speed
        self._origin_wall = datetime.now(UTC)
        self._origin_mono = time.monotonic()
        self._offset = 0.0
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    def now(self) -> datetime:
        with self._lock:
            elapsed = (time.monotonic() - self._origin_mono) * self._speed + self._offset
        return self._origin_wall + timedelta(seconds=elapsed)

    def advance(self, seconds: float) -> datetime:
        """Skip ahead (useful in a demo to jump over a long wait)."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards ({seconds} s)")
        with self._lock:
            self._offset += seconds
        return self._moved(self.now())

    @property
    def virtual(self) -> bool:
        return False


Clock = VirtualClock | WallClock


def iso(moment: datetime) -> str:
    """ARM's timestamp format: ISO 8601 in UTC with 7 fractional digits and a Z."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}0Z"
