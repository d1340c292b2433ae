"""Figure 4's fresh process: `python -m bench.cold_child INFO TICKS` prints one JSON line.

It imports only the standard library, the app (`import function_app`, timed on its own) and
the benchmark's harness (armsim's clock, `bench.wiring`, `devkit.host`), none of which imports
a module of the app's runtime: every module the first tick needs (the app's, azure-core,
azure-data-tables, urllib3) is imported inside the timed tick, as in a new worker.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from typing import Any

AUDIT_INTERVAL = 3600
"""Seconds from one audit to the next (the default interval: 60 min)."""


def child(info: dict[str, Any], *, ticks: int = 2) -> dict[str, Any]:
    """Import the app, then time the first timer tick and (with 2 ticks) the same tick warm,
    an audit interval later. The clock starts `info["hours"]` after armsim's start (1: an
    hour after an earlier process's audit, which is due again)."""
    started = time.perf_counter()
    import function_app  # noqa: F401

    imported = time.perf_counter() - started
    from armsim.clock import DEFAULT_START, VirtualClock
    from bench.wiring import table_store, wire
    from devkit.host import Host

    host = Host()
    before = set(sys.modules)
    begin, cpu = time.perf_counter(), time.process_time()
    store = table_store(info["storage"], info["prefix"])
    clock = VirtualClock(DEFAULT_START + timedelta(hours=info.get("hours", 0)))
    compute, host.runtime = wire(info, store, clock)
    host.timer()
    first, first_cpu = time.perf_counter() - begin, time.process_time() - cpu
    imported_by_tick = [name for name in sys.modules if name not in before]
    first_tables = store.stats
    second = second_cpu = 0.0
    second_tables = first_tables - first_tables
    if ticks > 1:
        clock.advance(AUDIT_INTERVAL)  # the audit is due again: the same work, warm
        begin, cpu = time.perf_counter(), time.process_time()
        host.timer()
        second, second_cpu = time.perf_counter() - begin, time.process_time() - cpu
        second_tables = store.stats - first_tables
    compute.close()
    store.close()
    return {
        "import": imported,
        "first": first,
        "second": second,
        "first_cpu": first_cpu,
        "second_cpu": second_cpu,
        "first_tables": [first_tables.reads, first_tables.writes],
        "second_tables": [second_tables.reads, second_tables.writes],
        "modules": imported_by_tick,
    }


if __name__ == "__main__":
    info, ticks = json.loads(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2
    print(json.dumps(child(info, ticks=ticks)))
