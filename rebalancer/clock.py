"""The app's one notion of time, injected everywhere: the current time (decisions, records),
monotonic seconds (budgets, TTLs) and a way to wait.

Injected so that tests (and armsim's virtual time) decide what time it is and how long a wait
really takes; the app reads the system clock only through `SystemClock`.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def sleep(self, seconds: float) -> None: ...

    def sleep_until(self, deadline: float) -> None:
        """Wait until `monotonic()` reaches `deadline` (no wait if it has already)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def sleep_until(self, deadline: float) -> None:
        self.sleep(deadline - self.monotonic())


class _Advancing(Protocol):
    def now(self) -> datetime: ...

    def advance(self, seconds: float) -> Any: ...


class VirtualTime:
    """A `Clock` over a simulated clock that has `now()` and `advance(seconds)` (armsim's).

    Waiting moves the simulated time forward instead of sleeping. Waits are serialised, and
    `sleep_until` never moves time past its deadline, so several callers waiting for slots
    booked at once move time to the latest deadline, not by the sum of their waits.
    """

    def __init__(self, clock: _Advancing) -> None:
        self._clock = clock
        self._origin = clock.now()
        self._lock = threading.Lock()

    def now(self) -> datetime:
        return self._clock.now()

    def monotonic(self) -> float:
        return (self._clock.now() - self._origin).total_seconds()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.sleep_until(self.monotonic() + seconds)

    def sleep_until(self, deadline: float) -> None:
        with self._lock:
            remaining = deadline - self.monotonic()
            if remaining > 0:
                self._clock.advance(remaining)
