"""`TtlCache`: what the Compute adapter reads rarely (SKUs, usages, autoscale settings),
kept for a time on the injected clock; a failed read is remembered briefly too."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rebalancer.clock import Clock
from rebalancer.compute.errors import AdapterError, ErrorKind


@dataclass(slots=True)
class _Cached:
    value: Any
    expires: float


@dataclass
class TtlCache:
    clock: Clock
    _entries: dict[tuple[str, str], _Cached] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    error_ttl: float = 60.0
    """How long a failed load is remembered, so a missing API is not asked on every call."""

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def get(self, key: tuple[str, str], ttl: float, load: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires > self.clock.monotonic():
                if isinstance(entry.value, AdapterError):
                    raise entry.value
                return entry.value
        try:
            value = load()
        except AdapterError as error:
            if error.kind not in (ErrorKind.THROTTLED, ErrorKind.TRANSIENT):
                with self._lock:
                    expires = self.clock.monotonic() + min(ttl, self.error_ttl)
                    self._entries[key] = _Cached(error, expires)
            raise
        with self._lock:
            self._entries[key] = _Cached(value, self.clock.monotonic() + ttl)
        return value
