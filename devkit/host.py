"""The Functions host, as far as local runs need it: index the app's functions, decode trigger
payloads with the azure.functions converters, and invoke the decorated functions on a runtime.

`FunctionApp.get_functions()` builds the functions from their decorators and may run only once
per app (a second call fails: "does not have a unique function name"), as the host calls it
once at start. Tests, the demo, the chaos suite and the benchmarks share this index, and call
the functions through `Host` rather than decoding payloads themselves.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from rebalancer.azure_operations import (
    EVENT_GRID_FUNCTION_NAME,
    FOLLOW_UP_FUNCTION_NAME,
    TIMER_FUNCTION_NAME,
)

if TYPE_CHECKING:
    from rebalancer.service import Runtime

PROJECT = Path(__file__).resolve().parent.parent
"""The clone's root, where function_app.py lives."""


def function_app() -> Any:
    """The real `function_app.app`, also when the current directory is not the project."""
    try:
        return importlib.import_module("function_app").app
    except ModuleNotFoundError:
        if not (PROJECT / "function_app.py").is_file():
            raise
        sys.path.insert(0, str(PROJECT))
        return importlib.import_module("function_app").app


@functools.cache
def indexed_functions() -> Mapping[str, Any]:
    """`function name -> azure.functions Function` of `function_app.app`, built once."""
    app = function_app()
    return MappingProxyType({f.get_function_name(): f for f in app.get_functions()})


def user_function(name: str) -> Callable[..., Any]:
    """The decorated Python function behind a function name, as the host invokes it."""
    return indexed_functions()[name].get_user_function()


def decode_event(payload: Any) -> Any:
    """The `func.EventGridEvent` the host hands the function for this Event Grid payload;
    raises when the host could not decode it."""
    from azure.functions.eventgrid import EventGridEventInConverter
    from azure.functions.meta import Datum

    return EventGridEventInConverter.decode(Datum(json.dumps(payload), "json"), trigger_metadata={})


def decode_timer(
    past_due: bool = False, *, now: datetime | None = None, period: timedelta | None = None
) -> Any:
    """The `func.TimerRequest` of one tick; with `now` and `period`, the schedule status the
    host sends along (the function reads only `past_due`)."""
    from azure.functions.meta import Datum
    from azure.functions.timer import TimerRequestConverter

    body: dict[str, Any] = {"IsPastDue": past_due, "ScheduleStatus": {}}
    if now is not None and period is not None:
        body["Schedule"] = {"AdjustForDST": True}
        body["ScheduleStatus"] = {
            "Last": (now - period).isoformat(),
            "Next": (now + period).isoformat(),
            "LastUpdated": (now - period).isoformat(),
        }
    return TimerRequestConverter.decode(Datum(json.dumps(body), "json"), trigger_metadata={})


def decode_queue_message(body: str, message_id: str = "") -> Any:
    """The `func.QueueMessage` the host hands the queue function (Base64 already decoded)."""
    import uuid

    from azure.functions.meta import Datum
    from azure.functions.queue import QueueMessageInConverter

    return QueueMessageInConverter.decode(
        Datum(body, "string"),
        trigger_metadata={"Id": Datum(message_id or uuid.uuid4().hex, "string")},
    )


class Host:
    """Invokes the app's functions as the Functions host does, on `runtime` (the
    caller's parts, for this thread's invocations only) or, without one, on the runtime the
    app builds from its settings."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime
        self.on_event = user_function(EVENT_GRID_FUNCTION_NAME)
        self.on_timer = user_function(TIMER_FUNCTION_NAME)
        self.on_follow_up = user_function(FOLLOW_UP_FUNCTION_NAME)

    def _serving(self) -> Any:
        from rebalancer import service

        return nullcontext() if self.runtime is None else service.serving(self.runtime)

    def event(self, payload: Any) -> None:
        """One delivery of an Event Grid payload (raises what the function raises)."""
        self.deliver(decode_event(payload))

    def deliver(self, event: Any) -> None:
        """One delivery of an already decoded event."""
        with self._serving():
            self.on_event(event)

    def timer(
        self,
        past_due: bool = False,
        *,
        now: datetime | None = None,
        period: timedelta | None = None,
    ) -> None:
        """One timer invocation."""
        timer = decode_timer(past_due, now=now, period=period)
        with self._serving():
            self.on_timer(timer)

    def follow_up(self, body: str, message_id: str = "") -> None:
        """One delivery of a follow-up queue message."""
        message = decode_queue_message(body, message_id)
        with self._serving():
            self.on_follow_up(message)
