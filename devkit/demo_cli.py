"""`rebalancer demo`: the whole product on this machine, no Azure account needed.

The scenario and the driver are in `devkit.demo`; this module draws what it does: a live
view on a terminal (rich), a plain progress log otherwise, then a summary table, or one JSON
object with `--json` (the progress then goes to stderr). docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from rebalancer.cli import EXIT_FAILURE, EXIT_OK, CliError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from devkit.demo import Endpoints, Frame, SetSummary, SetView, Summary

EXIT_INTERRUPTED = 130
LOG_WIDTH = 120
LIVE_PACE = 0.5
"""Real seconds per tick when someone watches the live view."""

WHAT_IT_DOES = (
    "The rebalancer keeps every zonal VM scale set within +/-1 VM per availability zone. When a "
    "zone holds too many, it moves VMs create-before-delete: it raises the capacity so Azure "
    "creates a VM in the emptiest zone, waits until that VM reports healthy, and only then "
    "deletes one in the fullest zone. It never deletes protected VMs, only reports on scale "
    "sets that are not opted in (tag zone-rebalance=enabled), and leaves a scale set alone "
    "for a cooldown after someone else changed it."
)
HOW_IT_RUNS = (
    "Nothing here touches Azure: armsim (a simulated Azure Compute API) and Azurite (Table "
    "Storage) run on 127.0.0.1, and the app's real Azure Functions handlers get the Event Grid "
    "events armsim emits (each twice, as Event Grid may deliver it: the app acts once) and a "
    "timer tick every 30 s of virtual time."
)

_MARKS = {
    "running": ("██", "green"),
    "protected": ("██", "bright_blue"),
    "new": ("██", "yellow"),
    "deleting": ("░░", "red"),
    "other": ("██", "grey50"),
}
LEGEND = (
    ("running", "healthy"),
    ("protected", "protected"),
    ("new", "new, not yet healthy"),
    ("deleting", "being deleted"),
    ("other", "stopped or unhealthy"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="watch the rebalancer fix a small simulated fleet (no Azure account needed)",
        description=(
            "Start Azurite and armsim on 127.0.0.1, seed a small fleet of scale sets, and drive "
            "the app's real function handlers with events and timer ticks in accelerated "
            "virtual time until the fleet settles (about 20 seconds). Stops everything it "
            "started when it ends, also on Ctrl-C."
        ),
        epilog="exit codes: 0 = every enforce-mode scale set ended balanced; 1 = it did not "
        "(the app's last log lines are printed) or the demo could not start; 130 = interrupted",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary on stdout at the end and nothing else (progress: stderr)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="a plain progress log instead of the live view (the default when not on a terminal)",
    )
    parser.add_argument(
        "--pace",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"real seconds per 30 s tick of virtual time (default {LIVE_PACE} with the live "
        "view, 0 otherwise)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from devkit.demo import DemoError, run_demo

    if args.pace is not None and not 0 <= args.pace <= 10:
        raise CliError(f"--pace must be between 0 and 10 seconds, got {args.pace}")
    console = Console(stderr=args.json, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH  # a log file or CI output, not an 80-column screen
    live = console.is_terminal and not args.plain
    pace = args.pace if args.pace is not None else (LIVE_PACE if live else 0.0)
    view = LiveView(console) if live else PlainView(console)
    try:
        with _interrupts_as_keyboard_interrupt(), view:
            summary, logs = run_demo(view.show, pace=pace, on_started=view.started)
    except KeyboardInterrupt:
        raise CliError(
            "interrupted; Azurite and armsim are stopped and their files removed",
            EXIT_INTERRUPTED,
        ) from None
    except DemoError as error:
        raise CliError(str(error), EXIT_FAILURE) from error
    if args.json:
        print(json.dumps(summary.to_json()))
    else:
        print_summary(console, summary)
    if summary.broken:
        print("rebalancer demo: the run broke the invariants of docs/safety.md:", file=sys.stderr)
        for line in summary.broken:
            print(f"  {line}", file=sys.stderr)
        return EXIT_FAILURE
    if not summary.converged:
        print(
            "rebalancer demo: the fleet did not settle within the demo's time limit; "
            "the app's last log lines:",
            file=sys.stderr,
        )
        for line in logs[-30:]:
            print(f"  {line}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


@contextmanager
def _interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo like Ctrl-C does, so that it cleans up after itself."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    watched = [signal.SIGTERM, getattr(signal, "SIGHUP", None)]
    saved = {sig: signal.signal(sig, interrupt) for sig in watched if sig is not None}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# -- views ------------------------------------------------------------------------------


class PlainView:
    """A progress log, one line per thing that happened, with the virtual time."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __enter__(self) -> PlainView:
        self.console.print(WHAT_IT_DOES, soft_wrap=True)
        self.console.print(HOW_IT_RUNS, soft_wrap=True)
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def started(self, endpoints: Endpoints) -> None:
        self.console.print(
            f"Started Azurite on 127.0.0.1:{endpoints.azurite_port} and armsim on "
            f"{endpoints.armsim_endpoint}.",
            soft_wrap=True,
        )

    def show(self, frame: Frame) -> None:
        if frame.tick == 0:
            self.console.print(f"Settings: {settings_line(frame)}", soft_wrap=True)
        for line in frame.news:
            self.console.print(
                f"[{frame.now:%H:%M:%S}] {line}", soft_wrap=True, markup=False, highlight=False
            )


class LiveView:
    """The fleet redrawn after every tick: a table per scale set, and what just happened.

    The explanation is printed once above; the live region holds only what changes, so that
    it fits a terminal of ordinary height.
    """

    def __init__(self, console: Console) -> None:
        from rich.live import Live

        self.console = console
        self.endpoints: Endpoints | None = None
        self.news: deque[str] = deque(maxlen=5)
        self._live = Live(console=console, auto_refresh=False, transient=False)

    def __enter__(self) -> LiveView:
        from rich.panel import Panel
        from rich.text import Text

        text = Text(WHAT_IT_DOES + "\n\n" + HOW_IT_RUNS)
        self.console.print(Panel(text, title="VMSS zone rebalancer: demo", border_style="cyan"))
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()

    def started(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints

    def show(self, frame: Frame) -> None:
        for line in frame.news:
            self.news.append(f"{frame.now:%H:%M:%S}  {line}")
        self._live.update(self.render(frame), refresh=True)

    def render(self, frame: Frame) -> RenderableType:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        status = Text()
        status.append(f"{frame.now:%H:%M:%S}", style="bold")
        status.append(
            f" virtual time (+{_duration(frame.elapsed)}), tick {frame.tick}, "
            f"{frame.events} Event Grid events delivered\n"
        )
        status.append("Settings: ", style="bold")
        status.append(settings_line(frame))
        if self.endpoints is not None:
            where = self.endpoints
            status.append(
                f"\nAzurite on 127.0.0.1:{where.azurite_port}, armsim on {where.armsim_endpoint}",
                style="dim",
            )
        columns = 2 if self.console.width >= 76 else 1
        grid = Table.grid(padding=(0, 2), expand=True)
        for _ in range(columns):
            grid.add_column(ratio=1)
        tables = [set_table(s) for s in frame.sets]
        for index in range(0, len(tables), columns):
            grid.add_row(*tables[index : index + columns])
        news = Text("\n".join(self.news) or "...", overflow="fold")
        return Group(
            status,
            grid,
            legend(),
            Panel(news, title="What just happened", border_style="dim"),
        )


def set_table(view: SetView) -> Any:
    """One scale set: a bar of VMs per zone, then its operation or the app's verdict."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    balance = "[green]balanced[/]" if view.balanced else "[red]out of balance[/]"
    moved = sum(o.moves for o in view.operations)
    title = Text.from_markup(f"[bold]{view.name}[/] ({view.orchestration}, {view.mode}) {balance}")
    if moved:
        title.append(f", {moved} moved")
    table = Table(show_header=False, box=box.ROUNDED, padding=(0, 1))
    table.add_column("zone", no_wrap=True)
    table.add_column("VMs", no_wrap=True, min_width=16)
    table.add_column("n", justify="right", no_wrap=True)
    for zone, marks in view.zones.items():
        bar = Text()
        for mark in marks:
            glyph, style = _MARKS.get(mark, _MARKS["other"])
            bar.append(glyph, style=style)
        table.add_row(f"zone {zone}", bar, str(view.counts.get(zone, 0)))
    operation = view.in_flight
    if operation is not None:
        caption = Text(f"{operation.state}", style="bold yellow")
        caption.append(f" ({operation.reason}): " if operation.reason else ": ", style="dim")
        caption.append(operation.says, style="default")
    else:
        caption = Text(view.verdict)
    return Group(title, table, caption)


def settings_line(frame: Frame) -> str:
    shown = ", ".join(f"{name}={value}" for name, value in frame.settings.items())
    return f"{shown} (a short cooldown for the demo; the default is 60)"


def legend() -> Any:
    from rich.text import Text

    text = Text("  ")
    for mark, meaning in LEGEND:
        glyph, style = _MARKS[mark]
        text.append(glyph, style=style)
        text.append(f" {meaning}   ")
    return text


def story(item: SetSummary) -> str:
    """What happened to one scale set, in a few words."""
    if item.mode == "audit":
        return "not opted in: reported, never changed"
    if item.mode == "disabled":
        return "opted out: left alone"
    if not item.operations and item.reason == "autoscale_at_maximum":
        return (
            "left alone (autoscale_at_maximum): its autoscale setting's maximum leaves no room "
            "for a move's extra VM; raise that maximum to let the app move VMs"
        )
    if not item.operations:
        return "already balanced: left alone" if item.balanced else "no move could start"
    moved = sum(o.moves for o in item.operations)
    text = f"{moved} VM(s) moved, each new VM healthy before its source was deleted"
    failed = [o.state for o in item.operations if o.state != "succeeded"]
    if failed:
        text += f"; {len(failed)} operation(s) ended {', '.join(sorted(set(failed)))}"
    if item.protected_before and set(item.protected_before) <= set(item.protected_after):
        text += f"; its {len(item.protected_before)} protected VMs kept"
    return text


def print_summary(console: Console, summary: Summary) -> None:
    from rich.table import Table

    from devkit.demo import format_counts

    table = Table(title="What the rebalancer did", title_justify="left", expand=True)
    for column in ("scale set", "kind", "mode", "before", "after", "balanced", "what happened"):
        table.add_column(column, no_wrap=column not in ("what happened",))
    for item in summary.sets:
        table.add_row(
            item.name,
            item.orchestration,
            item.mode,
            format_counts(item.before),
            format_counts(item.after),
            "[green]yes[/]" if item.balanced else "[red]no[/]",
            story(item),
        )
    console.print(table)
    console.print(
        f"VMs per zone as zone 1/2/3. {_duration(summary.elapsed)} of virtual time, "
        f"{summary.ticks} timer ticks, {summary.events} Event Grid events. Azurite and armsim "
        "are stopped.",
        soft_wrap=True,
    )
    console.print(
        "Next: `python -m rebalancer audit` reads a real subscription (read-only); "
        "docs/deploy.md deploys the app in audit mode.",
        soft_wrap=True,
        markup=False,
    )


def _duration(value: timedelta) -> str:
    minutes, seconds = divmod(int(value.total_seconds()), 60)
    return f"{minutes}m{seconds:02d}s"
