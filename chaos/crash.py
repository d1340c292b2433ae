"""Process death at a step boundary: proxies around the store and the Compute adapter.

A simulated worker process owns one `CrashPlan`. Every call through its proxies passes two
boundaries, before and after the real call; when the plan's count reaches `crash_at`, `Crash`
is raised there and the process is dead: every later boundary in it raises `Crash` too, so not
even a `finally:` block gets to write anything (a dead process releases no lock). The harness
then builds a fresh object graph; only Table Storage and armsim remember anything.

`Crash` derives from BaseException so that no `except Exception` in the product swallows it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any


class Crash(BaseException):
    """The worker process died at this boundary."""

    def __init__(self, boundary: str) -> None:
        super().__init__(f"process died {boundary}")
        self.boundary = boundary


class CrashPlan:
    """Counts the boundaries one worker passes and kills it at the `crash_at`-th (1-based)."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.passed = 0
        self.died_at: str | None = None
        self._lock = threading.Lock()

    @property
    def dead(self) -> bool:
        return self.died_at is not None

    def boundary(self, label: str) -> None:
        with self._lock:
            if self.died_at is not None:
                raise Crash(f"(already dead since {self.died_at})")
            self.passed += 1
            if self.crash_at is not None and self.passed >= self.crash_at:
                self.died_at = label
                raise Crash(label)


WriteHook = Callable[[str, tuple[Any, ...], dict[str, Any]], None]


class CrashingProxy:
    """Forwards every public method of `target` between two boundaries of `plan`.

    `before_call(name, args, kwargs)` (optional) runs after the "before" boundary and right
    before the real call: the invariant checker looks at the world there.
    """

    def __init__(
        self,
        target: Any,
        component: str,
        plan: CrashPlan,
        before_call: WriteHook | None = None,
        seen: Counter[str] | None = None,
    ) -> None:
        self._target = target
        self._component = component
        self._plan = plan
        self._before_call = before_call
        self._seen = seen if seen is not None else Counter()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            before, after = f"before {self._component}.{name}", f"after {self._component}.{name}"
            self._seen[before] += 1
            self._plan.boundary(before)
            if self._before_call is not None:
                self._before_call(name, args, kwargs)
            result = value(*args, **kwargs)
            if isinstance(result, Iterator):
                result = list(result)
            self._seen[after] += 1
            self._plan.boundary(after)
            return result

        return call
