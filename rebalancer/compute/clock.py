"""The adapter's notion of time: monotonic seconds for budgets and TTLs, and a way to wait.

Injected so that tests (and armsim's virtual time) decide how long a wait really takes.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any, Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class _Advancing(Protocol):
    def now(self) -> datetime: ...

    def advance(self, seconds: float) -> Any: ...


class VirtualTime:
    """A `Clock` over a simulated clock that has `now()` and `advance(seconds)` (armsim's).

    Waiting moves the simulated time forward instead of sleeping. Concurrent waiters wait
    *until* their own deadline, so two threads waiting 5 s move time by 5 s, not 10.
    """

    def __init__(self, clock: _Advancing) -> None:
        self._clock = clock
        self._origin = clock.now()
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return (self._clock.now() - self._origin).total_seconds()

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        deadline = self.monotonic() + seconds
        with self._lock:
            remaining = deadline - self.monotonic()
            if remaining > 0:
                self._clock.advance(remaining)
