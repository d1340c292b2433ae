"""`rebalancer status`: what the rebalancer is doing now and what it did, from Table Storage.

Reads only the app's tables (never Azure Compute): operations in flight with their state, age
and next step; recent finished operations per scale set; zones backed off for lack of
capacity. `--scale-set ID` shows one scale set's full history, with every step and the ARM
request ids of its calls, and the last assessment (why it did or did not move).

Storage, first match wins: `--connection-string`, `--table-endpoint` (identity-based, with
`DefaultAzureCredential`: `az login` works), else the app's own settings
(`AzureWebJobsStorage`, `AzureWebJobsStorage__tableServiceUri`; `UseDevelopmentStorage=true`
is Azurite).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rebalancer.cli import EXIT_FAILURE, EXIT_OK, CliError
from rebalancer.cli.tables import Column, print_table
from rebalancer.clock import SystemClock

if TYPE_CHECKING:
    from rebalancer.operation import OperationRecord
    from rebalancer.store import OperationRow, Store, ZoneBackoff

PREFIX_ENV = "REBALANCER_STATE_TABLE_PREFIX"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show in-flight operations, recent history and zone backoffs (from Table Storage)",
        description=(
            "Read the rebalancer's Table Storage state: operations in flight (state, age, next "
            "step), recent finished operations per scale set, and zones backed off for lack "
            "of capacity. With --scale-set, one scale set's full history with every step and "
            "the ARM request ids of its calls. Changes nothing."
        ),
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--connection-string",
        metavar="CS",
        help="storage connection string (default: $AzureWebJobsStorage; "
        "UseDevelopmentStorage=true is Azurite)",
    )
    where.add_argument(
        "--table-endpoint",
        metavar="URL",
        help="https://<account>.table.core.windows.net, read with DefaultAzureCredential "
        "(needs Storage Table Data Reader)",
    )
    parser.add_argument(
        "--table-prefix",
        metavar="PREFIX",
        help=f"table name prefix (default: ${PREFIX_ENV} or rebalancer)",
    )
    parser.add_argument(
        "--scale-set", metavar="ID", help="one scale set's full history (its resource id)"
    )
    parser.add_argument(
        "--days",
        type=float,
        default=7.0,
        metavar="N",
        help="recent history: operations that finished in the last N days (default 7)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="at most N operations per scale set (default 10; with --scale-set: 100)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    parser.set_defaults(handler=run)


# -- reading ---------------------------------------------------------------------------------


def open_status_store(args: argparse.Namespace, env: Mapping[str, str]) -> Store:
    from rebalancer.store import StorageConnection, Store, StoreConfigError, open_store

    prefix = args.table_prefix or env.get(PREFIX_ENV, "").strip() or "rebalancer"
    options: dict[str, Any] = {"retry_total": 1, "connection_timeout": 10, "read_timeout": 30}
    try:
        if args.connection_string:
            connection = StorageConnection("--connection-string", args.connection_string)
            return Store(connection, table_prefix=prefix, **options)
        if args.table_endpoint:
            if not args.table_endpoint.lower().startswith("https://"):
                raise CliError(
                    f"--table-endpoint {args.table_endpoint!r} must start with https:// "
                    "(e.g. https://<account>.table.core.windows.net)"
                )
            connection = StorageConnection(
                "--table-endpoint", table_service_uri=args.table_endpoint.rstrip("/")
            )
            return Store(connection, table_prefix=prefix, **options)
        return open_store(env, table_prefix=prefix, **options)
    except StoreConfigError as error:
        raise CliError(
            f"{error} (or pass --connection-string / --table-endpoint to `status`)"
        ) from error


def recent_finished(store: Store, since: datetime, limit: int) -> list[OperationRow]:
    """Finished operations of every scale set that ended after `since` (newest first)."""
    return store.finished_since(since, limit)


# -- the report (pure) -----------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _age(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def _record(row: OperationRow) -> OperationRecord | None:
    from rebalancer.operation import OperationRecord

    try:
        return OperationRecord.from_json(row.body)
    except ValueError:
        return None


def operation_summary(row: OperationRow, now: datetime, *, full: bool = False) -> dict[str, Any]:
    """One operation for the report; `full` adds every step, the VMs and the ARM request ids."""
    from rebalancer.operation import describe

    record = _record(row)
    started = row.created_at or row.updated_at
    summary: dict[str, Any] = {
        "scaleSetId": record.scale_set_id if record else row.scale_set_key,
        "operationId": row.operation_id,
        "state": row.state,
        "startedAt": _iso(started),
        "updatedAt": _iso(row.updated_at),
        "ageSeconds": round((now - started).total_seconds()),
    }
    if record is None:
        summary["error"] = "the stored record cannot be read by this version"
        return summary
    summary |= {
        "moves": [
            {"fromZone": m.from_zone, "toZone": m.to_zone, "source": m.source} for m in record.moves
        ],
        "targetZones": list(record.target_zones),
        "capacity": {"before": record.baseline.capacity, "target": record.target_capacity},
    }
    if record.active:
        summary["nextStep"] = describe(record, now)
    else:
        summary |= {
            "endedAt": _iso(record.updated_at),
            "durationSeconds": round((record.updated_at - record.created_at).total_seconds()),
            "outcome": record.outcome.value if record.outcome else None,
            "detail": record.outcome_detail,
            "description": record.outcome.describe() if record.outcome else "",
        }
    if full:
        summary |= {
            "steps": [
                {
                    "at": _iso(t.at),
                    "state": t.state.value,
                    "reason": t.reason.value,
                    "detail": t.detail,
                    "description": t.reason.describe(),
                }
                for t in record.history
            ],
            "created": dict(record.created),
            "kept": list(record.kept),
            "sources": list(record.sources),
            "deleteRequested": sorted(record.delete_requested),
            "armCalls": list(record.arm_calls),
        }
    return summary


def backoff_summary(backoff: ZoneBackoff) -> dict[str, Any]:
    return {
        "location": backoff.location,
        "sku": backoff.sku,
        "zone": backoff.zone,
        "failures": backoff.failures,
        "lastFailureAt": _iso(backoff.last_failure_at),
        "until": _iso(backoff.until),
    }


def build_status(
    active: Sequence[OperationRow],
    finished: Sequence[OperationRow],
    backoffs: Sequence[ZoneBackoff],
    now: datetime,
    *,
    per_scale_set: int = 10,
) -> dict[str, Any]:
    """The subscription-wide report: in flight, recent history grouped by scale set, backoffs."""
    history: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(finished, key=lambda r: r.updated_at, reverse=True):
        summary = operation_summary(row, now)
        entries = history.setdefault(summary["scaleSetId"], [])
        if len(entries) < per_scale_set:
            entries.append(summary)
    return {
        "at": now.isoformat(),
        "inFlight": [
            operation_summary(row, now) for row in sorted(active, key=lambda r: r.updated_at)
        ],
        "history": history,
        "backoffs": [backoff_summary(b) for b in sorted(backoffs, key=lambda b: b.until)],
    }


def build_scale_set_status(
    scale_set_id: str,
    rows: Sequence[OperationRow],
    assessment: Mapping[str, Any] | None,
    assessed_at: datetime | None,
    now: datetime,
) -> dict[str, Any]:
    return {
        "at": now.isoformat(),
        "scaleSetId": scale_set_id,
        "lastAssessment": (
            {"at": _iso(assessed_at), **assessment} if assessment is not None else None
        ),
        "operations": [operation_summary(row, now, full=True) for row in rows],
    }


# -- printing --------------------------------------------------------------------------------


def _short(scale_set_id: str) -> str:
    from rebalancer.model import ScaleSetRef

    try:
        ref = ScaleSetRef.parse(scale_set_id)
    except ValueError:
        return scale_set_id
    return f"{ref.resource_group}/{ref.name}"


def _when(text: str | None) -> str:
    if not text:
        return "-"
    return datetime.fromisoformat(text).astimezone(UTC).strftime("%Y-%m-%d %H:%M")


IN_FLIGHT_COLUMNS = (
    Column("scale set"),
    Column("operation", priority=2, code=True),
    Column("state", code=True),
    Column("age", priority=1, code=True),
    Column("next step"),
)
HISTORY_COLUMNS = (
    Column("scale set"),
    Column("operation", priority=4, code=True),
    Column("ended (UTC)", priority=1, code=True),
    Column("state", code=True),
    Column("took", priority=3, code=True),
    Column("reason", code=True),
    Column("detail", priority=2),
)
BACKOFF_COLUMNS = (
    Column("location", code=True),
    Column("size", code=True),
    Column("zone", code=True),
    Column("failures", priority=1, code=True),
    Column("until (UTC)", code=True),
)
ACTOR_STEPS = frozenset({"repair_replaced"})
"""Steps where another actor acted: their description names the setting that changes it."""
STEP_COLUMNS = (
    Column("at (UTC)", priority=1, code=True),
    Column("state", code=True),
    Column("reason", code=True),
    Column("detail"),
)


def print_status(report: Mapping[str, Any]) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    in_flight = [
        (
            _short(op["scaleSetId"]),
            op["operationId"][:12],
            op["state"],
            _age(op["ageSeconds"]),
            op.get("nextStep", op.get("error", "")),
        )
        for op in report["inFlight"]
    ]
    if in_flight:
        print_table(console, "Operations in flight", IN_FLIGHT_COLUMNS, in_flight)
    else:
        console.print("No operation in flight.")

    history = [
        (
            _short(scale_set_id),
            op["operationId"][:12],
            _when(op.get("endedAt")),
            op["state"],
            _age(op.get("durationSeconds", 0)),
            op.get("outcome") or "-",
            op.get("detail") or "",
        )
        for scale_set_id, ops in report["history"].items()
        for op in ops
    ]
    if history:
        print_table(console, "Recent operations", HISTORY_COLUMNS, history)
    else:
        console.print("No finished operation in the period.")

    backoffs = [
        (b["location"], b["sku"], b["zone"], str(b["failures"]), _when(b["until"]))
        for b in report["backoffs"]
    ]
    if backoffs:
        print_table(console, "Zones backed off (no capacity)", BACKOFF_COLUMNS, backoffs)
    else:
        console.print("No zone is backed off.")


def print_scale_set_status(report: Mapping[str, Any]) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"[bold]{report['scaleSetId']}[/bold]")
    assessment = report["lastAssessment"]
    if assessment is None:
        console.print("Never assessed (or the assessment was purged).")
    else:
        zones = "  ".join(
            f"{z}: {c.get('total')}/{c.get('active')}"
            for z, c in (assessment.get("zones") or {}).items()
        )
        console.print(
            f"Last assessment {_when(assessment['at'])}: zones total/active {zones}; "
            f"decision [bold]{assessment.get('decision')}[/bold] "
            f"({assessment.get('reason')}) {assessment.get('detail', '')}"
        )
    if not report["operations"]:
        console.print("No operation recorded.")
    for op in report["operations"]:
        title = (
            f"Operation {op['operationId']}: {op['state']}, started {_when(op['startedAt'])}"
            + (f", ended {_when(op.get('endedAt'))}" if op.get("endedAt") else "")
        )
        steps = [
            (_when(step["at"]), step["state"], step["reason"], step["detail"])
            for step in op.get("steps", ())
        ]
        print_table(console, title, STEP_COLUMNS, steps)
        for step in op.get("steps", ()):
            if step["reason"] in ACTOR_STEPS and step.get("description"):
                console.print(f"{step['reason']}: {step['description']}")
        if op.get("nextStep"):
            console.print(f"Next: {op['nextStep']}")
        if op.get("description"):
            console.print(f"Outcome: {op['description']}")
        if op.get("armCalls"):
            console.print("ARM calls (request/correlation ids): " + ", ".join(op["armCalls"]))


# -- the command ----------------------------------------------------------------------------


def run(
    args: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> int:
    from rebalancer.model import ScaleSetRef
    from rebalancer.store import StoreError

    env = os.environ if env is None else env
    now = now or SystemClock().now()
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be at least 1, got {args.limit}")
    if args.days <= 0:
        raise CliError(f"--days must be more than 0, got {args.days}")
    ref = None
    if args.scale_set:
        try:
            ref = ScaleSetRef.parse(args.scale_set)
        except ValueError as error:
            raise CliError(
                f"--scale-set {args.scale_set!r} is not a scale set resource id "
                "(/subscriptions/.../resourceGroups/.../providers/Microsoft.Compute/"
                "virtualMachineScaleSets/NAME)"
            ) from error
    # The credential chain's own warning repeats what the error below says.
    identity_log = logging.getLogger("azure.identity")
    level = identity_log.level
    identity_log.setLevel(logging.ERROR)
    store = open_status_store(args, env)
    try:
        with store:
            if ref is not None:
                rows = store.history(ref.key, limit=args.limit or 100)
                stored = store.last_assessment(ref.key)
                assessment = json.loads(stored.body) if stored is not None else None
                report = build_scale_set_status(
                    ref.id, rows, assessment, stored.at if stored else None, now
                )
            else:
                since = now - timedelta(days=args.days)
                report = build_status(
                    store.active_operations(),
                    recent_finished(store, since, limit=1000),
                    store.backoffs(now),
                    now,
                    per_scale_set=args.limit or 10,
                )
    except StoreError as error:
        hint = ""
        if args.table_endpoint:
            hint = (
                " (for --table-endpoint, `az login` as someone with Storage Table Data Reader "
                "on the account)"
            )
        raise CliError(f"Table Storage: {error}{hint}", EXIT_FAILURE) from error
    finally:
        identity_log.setLevel(level)
    if args.json:
        print(json.dumps(report, indent=2))
    elif ref is not None:
        print_scale_set_status(report)
    else:
        print_status(report)
    return EXIT_OK
