"""`python -m bench [--quick] [--only NAME ...]`: run the benchmarks, print lines and a table."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from bench.common import Figure, azurite_store

GROUPS = (
    "audit",
    "balance",
    "cold_start",
    "steady_state",
    "memory",
    "throttling",
    "audit_slices",
)


@dataclass(frozen=True, slots=True)
class Sizes:
    audit_sets: int = 1000
    audit_vms: int = 50
    naive_sets: int = 200
    latency: float = 0.02
    page_sets: int = 40
    page_rounds: int = 3
    steady_sets: int = 1000
    steady_vms: int = 6
    memory_sets: int = 1000
    memory_vms: int = 50
    cold_runs: int = 7
    wave_sets: int = 20
    slices_sets: int = 5000
    slices_vms: int = 100
    quick: bool = False


QUICK = Sizes(
    audit_sets=6,
    audit_vms=6,
    naive_sets=2,
    latency=0.001,
    page_sets=4,
    page_rounds=1,
    steady_sets=4,
    steady_vms=3,
    memory_sets=4,
    memory_vms=6,
    cold_runs=1,
    wave_sets=3,
    slices_sets=4,
    slices_vms=6,
    quick=True,
)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages * size / 2**30:.1f} GiB"
    except (ValueError, OSError):
        pass
    return f"{os.cpu_count()} CPUs ({model}){memory}, Python {platform.python_version()}"


def run_group(name: str, sizes: Sizes) -> list[Figure]:
    if name == "audit":
        from bench import audit_cost, read_cpu

        return audit_cost.run(
            scale_sets=sizes.audit_sets,
            vms=sizes.audit_vms,
            naive_scale_sets=sizes.naive_sets,
            latency=sizes.latency,
        ) + read_cpu.run(scale_sets=sizes.page_sets, vms=sizes.audit_vms, rounds=sizes.page_rounds)
    if name == "balance":
        from bench import moves, time_to_balance

        cases = time_to_balance.SMALL_CASES if sizes.quick else time_to_balance.CASES
        with azurite_store() as factory:
            runs = time_to_balance.run(factory, cases)
        return time_to_balance.figures(runs) + moves.figures(runs)
    if name == "cold_start":
        from bench import cold_start

        return cold_start.run(runs=sizes.cold_runs, scale_sets=2 if sizes.quick else 10)
    if name == "steady_state":
        from bench import steady_state

        with azurite_store() as factory:
            return steady_state.run(factory, scale_sets=sizes.steady_sets, vms=sizes.steady_vms)
    if name == "memory":
        from bench import memory

        return memory.run(scale_sets=sizes.memory_sets, vms=sizes.memory_vms)
    if name == "throttling":
        from bench import throttling

        with azurite_store() as factory:
            return throttling.run(
                factory,
                wave_sets=sizes.wave_sets,
                audit_sets=sizes.audit_sets,
                audit_vms=sizes.audit_vms,
                latency=sizes.latency,
            )
    if name == "audit_slices":
        from bench import audit_slices

        return audit_slices.run(
            scale_sets=sizes.slices_sets, vms=sizes.slices_vms, latency=sizes.latency
        )
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(GROUPS)}")


def table(figures: list[Figure], caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from bench.common import number

    grid = Table(title="rebalancer benchmarks", caption=caption, show_lines=False)
    for column in ("figure", "value", "baseline", "ratio", "goal", "met", "behind it"):
        grid.add_column(column, overflow="fold")
    for figure in figures:
        met = {True: "yes", False: "NO", None: "-"}[figure.met]
        grid.add_row(
            figure.name,
            f"{number(figure.value)} {figure.unit}",
            f"{number(figure.baseline)} ({figure.baseline_label})"
            if figure.baseline_label
            else number(figure.baseline),
            number(figure.ratio),
            figure.goal,
            met,
            figure.detail,
        )
    Console(width=max(160, Console().width)).print(grid)


def main(argv: list[str] | None = None, *, out: Callable[[str], None] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): a smoke run")
    parser.add_argument(
        "--only", action="append", choices=GROUPS, help="run only these benchmarks (repeatable)"
    )
    parser.add_argument("--no-table", action="store_true", help="print the bench: lines only")
    parser.add_argument(
        "--naive-sets",
        type=int,
        metavar="N",
        help="scale sets the naive audit reads (default 200, scaled to the fleet; 1000: in full)",
    )
    args = parser.parse_args(argv)
    emit = out or (lambda line: print(line, flush=True))
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("rebalancer").setLevel(logging.CRITICAL)
    sizes = QUICK if args.quick else Sizes()
    if args.naive_sets is not None:
        if args.naive_sets < 1:
            parser.error("--naive-sets must be at least 1")
        sizes = replace(sizes, naive_sets=args.naive_sets)
    started = time.perf_counter()
    figures: list[Figure] = []
    for name in args.only or GROUPS:
        begun = time.perf_counter()
        group = run_group(name, sizes)
        for figure in group:
            emit(figure.line())
        figures.extend(group)
        print(f"# {name}: {time.perf_counter() - begun:.1f} s", file=sys.stderr, flush=True)
    caption = f"{machine()}; {time.perf_counter() - started:.0f} s in all"
    if not args.no_table:
        table(figures, caption)
    return 0


if __name__ == "__main__":
    sys.exit(main())
