"""`rebalancer audit`: a read-only zone-balance report of every zonal scale set in a subscription.

Reads through the Compute adapter (one `list_all`, then one VM list per scale set, within the
throttling budget), assesses each set with the evaluator, and prints a table or `--json`.
Nothing is changed. Exit codes are listed in `EXIT_CODES` and docs/audit-command.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rebalancer.autoscale import REASON as AUTOSCALE_REASON
from rebalancer.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError
from rebalancer.cli.tables import Column, print_table
from rebalancer.clock import SystemClock

UPGRADE_REASON = "upgrade_in_progress"
REPAIR_REASON = "repair_replaced"

EXIT_PARTIAL = EXIT_FAILURE
EXIT_NOT_LOGGED_IN = 3
EXIT_FORBIDDEN = 4
EXIT_SUBSCRIPTION_NOT_FOUND = 5
EXIT_THROTTLED = 6
EXIT_UNREACHABLE = 7
EXIT_AZURE_ERROR = 8

EXIT_CODES: Mapping[int, str] = {
    EXIT_OK: "every zonal scale set in scope was read and assessed",
    EXIT_PARTIAL: "the report is printed, but some scale sets could not be read (see errors)",
    EXIT_USAGE: "bad arguments (no subscription, bad endpoint, static token for a remote host)",
    EXIT_NOT_LOGGED_IN: "no Azure credential: not logged in, or the token was rejected",
    EXIT_FORBIDDEN: "the identity lacks a permission on the subscription (the action is named)",
    EXIT_SUBSCRIPTION_NOT_FOUND: "the subscription does not exist or is not visible",
    EXIT_THROTTLED: "Azure throttled the listing; try again after the time given",
    EXIT_UNREACHABLE: "the ARM endpoint could not be reached (network, DNS, TLS certificate)",
    EXIT_AZURE_ERROR: "any other Azure error while listing the scale sets",
}

STATIC_TOKEN_ENV = "REBALANCER_ARM_STATIC_TOKEN"
SUBSCRIPTION_ENVS = ("AZURE_SUBSCRIPTION_ID", "REBALANCER_SUBSCRIPTION_ID")
READER_HINT = (
    "grant the identity the Reader role on the subscription (or a custom role with "
    "Microsoft.Compute/virtualMachineScaleSets/read, .../virtualMachines/read, "
    "Microsoft.Compute/virtualMachines/read)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="report the zone balance of every zonal scale set in a subscription (read-only)",
        description=(
            "Read every zonal scale set of a subscription and report per zone the total and "
            "active VM counts, whether it is balanced, the opt-in mode (zone-rebalance tag), "
            "and the decision, reason and moves the rebalancer would make. Changes nothing."
        ),
        epilog="exit codes: "
        + "; ".join(f"{code} = {text}" for code, text in sorted(EXIT_CODES.items())),
    )
    parser.add_argument(
        "--subscription",
        metavar="ID",
        help="subscription id (default: $AZURE_SUBSCRIPTION_ID, $REBALANCER_SUBSCRIPTION_ID, "
        "or the Azure CLI's default subscription)",
    )
    parser.add_argument(
        "--resource-group",
        action="append",
        default=[],
        metavar="RG",
        help="only scale sets in this resource group (repeatable; default: all)",
    )
    parser.add_argument(
        "--arm-endpoint",
        metavar="URL",
        help="Azure Resource Manager endpoint (default: the public cloud's; a sovereign "
        "cloud's, or armsim's https://127.0.0.1:PORT)",
    )
    parser.add_argument(
        "--ca-cert", type=Path, metavar="PATH", help="CA certificate to trust for the endpoint"
    )
    parser.add_argument(
        "--authority", metavar="HOST", help="Entra ID authority host (sovereign clouds)"
    )
    parser.add_argument(
        "--default-opt-in",
        choices=("audit", "enabled", "disabled"),
        help="mode reported for untagged scale sets (default: $REBALANCER_DEFAULT_OPT_IN or audit)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, metavar="N", help="scale sets read at once"
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="longest wait on Azure throttling before giving up (default 60)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.set_defaults(handler=run)


def default_subscription(env: Mapping[str, str]) -> str | None:
    """The subscription from the environment, else the Azure CLI's default one."""
    for name in SUBSCRIPTION_ENVS:
        if env.get(name, "").strip():
            return env[name].strip()
    config_dir = Path(env.get("AZURE_CONFIG_DIR") or Path.home() / ".azure")
    try:
        profile = json.loads((config_dir / "azureProfile.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    for subscription in profile.get("subscriptions") or ():
        if subscription.get("isDefault") and subscription.get("id"):
            return str(subscription["id"])
    return None


def _adapter(args: argparse.Namespace, subscription: str, env: Mapping[str, str]):
    from rebalancer.compute import PUBLIC_ENDPOINT, ArmConfig, ComputeAdapter
    from rebalancer.compute.credentials import StaticTokenCredential

    endpoint = (args.arm_endpoint or PUBLIC_ENDPOINT).rstrip("/")
    if args.ca_cert is not None and not args.ca_cert.is_file():
        raise CliError(f"--ca-cert {args.ca_cert}: file not found")
    if args.concurrency < 1:
        raise CliError(f"--concurrency must be at least 1, got {args.concurrency}")
    try:
        config = ArmConfig(
            subscription_id=subscription,
            endpoint=endpoint,
            authority=args.authority,
            ca_cert=str(args.ca_cert) if args.ca_cert else None,
            audit_concurrency=args.concurrency,
            max_wait=max(0.0, args.max_wait),
        )
        token = env.get(STATIC_TOKEN_ENV, "").strip()
        credential = StaticTokenCredential(token, endpoint) if token else None
    except ValueError as error:
        raise CliError(f"{error}") from error
    return ComputeAdapter(config, credential)


def _fatal(error, subscription: str, endpoint: str, *, loopback: bool = False) -> CliError:
    """A failure of the subscription listing, as one line saying what to do. `loopback`: the
    endpoint is a local simulator and no static token was given."""
    from rebalancer.compute import ErrorKind

    kind = error.kind
    if kind is ErrorKind.UNAUTHENTICATED and loopback:
        return CliError(
            f"no credential for the loopback endpoint {endpoint}: set {STATIC_TOKEN_ENV} "
            f"(any value, e.g. {STATIC_TOKEN_ENV}=test for armsim) or log in with `az login`. "
            f"({error.message})",
            EXIT_NOT_LOGGED_IN,
        )
    if (error.code or "").lower() == "invalidauthenticationtokentenant":
        return CliError(
            f"subscription {subscription} belongs to another Entra ID tenant than your login: "
            "run `az login --tenant <its tenant>` (or check --subscription).",
            EXIT_SUBSCRIPTION_NOT_FOUND,
        )
    if kind is ErrorKind.UNAUTHENTICATED:
        return CliError(
            "not logged in to Azure: run `az login` (or configure a managed identity or the "
            f"AZURE_* environment variables for DefaultAzureCredential) and retry. "
            f"({error.message})",
            EXIT_NOT_LOGGED_IN,
        )
    if kind is ErrorKind.FORBIDDEN:
        action = error.missing_action or "Microsoft.Compute/virtualMachineScaleSets/read"
        return CliError(
            f"no access to subscription {subscription}: the identity lacks '{action}'; "
            f"{READER_HINT}.",
            EXIT_FORBIDDEN,
        )
    if kind is ErrorKind.NOT_FOUND:
        return CliError(
            f"subscription {subscription} was not found (or this identity cannot see it): "
            "check --subscription against `az account list`.",
            EXIT_SUBSCRIPTION_NOT_FOUND,
        )
    if kind is ErrorKind.THROTTLED:
        wait = f"{error.retry_after:.0f} s" if error.retry_after is not None else "a few minutes"
        return CliError(
            f"Azure is throttling Compute reads in this subscription; try again in {wait}, or "
            "audit fewer resource groups with --resource-group.",
            EXIT_THROTTLED,
        )
    if (error.code or "") == "ConnectionError":
        return CliError(
            f"cannot reach the ARM endpoint {endpoint}: {error.message}. Check the URL and the "
            "network; for armsim, that it runs and --ca-cert names its certificate.",
            EXIT_UNREACHABLE,
        )
    return CliError(f"listing scale sets failed: {error}", EXIT_AZURE_ERROR)


def _moves(assessment) -> list[dict[str, str]]:
    return [
        {"fromZone": move.from_zone, "toZone": move.to_zone, "source": move.source}
        for move in assessment.moves
    ]


DETAILED_REASONS = frozenset({"instance_mix", "standby_pool", "spot_priority_mix"})
"""Skips whose `detail` the report carries: what the set uses and the setting that changes it."""


def build_report(
    subscription: str,
    results: Sequence[Any],
    settings: Any,
    autoscale: Sequence[Any] = (),
    now: datetime | None = None,
    upgrades: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    """The `--json` document, and (inventory, assessment, mode, autoscale, wait) rows.

    A planned move that capacity + k would carry past the autoscale maximum is reported as a
    skip with reason `autoscale_at_maximum` and a `detail` naming the setting, as the app does;
    one the app would hold while an upgrade runs (`provisioningState` Updating, or
    `upgrades[key]` RollingForward) as a wait with reason `upgrade_in_progress`. An enabled
    `automaticRepairsPolicy` is reported with what it means for a move (`automaticRepairs`).
    """
    from rebalancer.autoscale import at_maximum
    from rebalancer.compute import AdapterError
    from rebalancer.evaluator import Decision, assess
    from rebalancer.settings import OPT_IN_TAG

    entries: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    rows: list[tuple[Any, Any]] = []
    for result in results:
        if isinstance(result, AdapterError):
            errors.append(
                {
                    "id": result.ref.id if result.ref else None,
                    "kind": str(result.kind),
                    "code": result.code,
                    "message": result.message,
                    "retryAfter": result.retry_after,
                }
            )
            continue
        assessment = assess(result)
        mode = settings.opt_in(result.scale_set.tag(OPT_IN_TAG))
        held = wait = None
        if assessment.decision is Decision.MOVE:
            scale_set = result.scale_set
            capacity = scale_set.capacity
            if capacity is None:
                capacity = sum(1 for instance in result.instances if instance.counts)
            k = min(len(assessment.moves), settings.max_surge)
            held = at_maximum(autoscale, scale_set.ref, capacity, k, now or SystemClock().now())
            if held is None:
                wait = _upgrade_wait(scale_set, (upgrades or {}).get(scale_set.ref.key))
        decision = "skip" if held else ("wait" if wait else assessment.decision.value)
        reason = AUTOSCALE_REASON if held else (UPGRADE_REASON if wait else assessment.reason.value)
        entry: dict[str, Any] = {
            "id": result.scale_set.ref.id,
            "balanced": assessment.balanced,
            "zones": {
                zone: {"total": count.total, "active": count.active}
                for zone, count in assessment.zones.items()
            },
            "decision": decision,
            "reason": reason,
            "mode": mode.value,
            "moves": _moves(assessment),
        }
        if held:
            entry["detail"] = held.describe()
        elif wait:
            entry["detail"] = wait
        elif assessment.reason.value in DETAILED_REASONS:
            entry["detail"] = assessment.detail
        repairs = result.scale_set.automatic_repairs
        if repairs is not None:
            entry["automaticRepairs"] = {
                "repairAction": repairs.action.value,
                "gracePeriodMinutes": int(repairs.grace_period.total_seconds() // 60),
                "note": repairs_note(repairs, settings.health_timeout),
            }
        entries.append(entry)
        rows.append((result, assessment, mode, held, wait))
    entries.sort(key=lambda entry: entry["id"].lower())
    errors.sort(key=lambda entry: (entry["id"] or "").lower())
    rows.sort(key=lambda row: row[0].scale_set.ref.key)
    report: dict[str, Any] = {"subscription": subscription, "scaleSets": entries}
    if errors:
        report["errors"] = errors
    return report, rows


AUDIT_COLUMNS = (
    Column("scale set"),
    Column("resource group", priority=3),
    Column("mode", priority=6),
    Column("opt-in", priority=2, code=True),
    Column("zones", priority=1, code=True),
    Column("balanced", priority=4),
    Column("decision", priority=1, code=True),
    Column("reason", code=True),
    Column("moves", priority=5),
)


def _upgrade_wait(scale_set: Any, upgrade: Any) -> str | None:
    """Why the app would wait for an upgrade (as its `upgrade_in_progress` gate), or None."""
    if scale_set.provisioning_state.lower() == "updating":
        return (
            "provisioningState is Updating (a model change or upgrade by someone else); the app "
            "waits until it is Succeeded"
        )
    if upgrade is not None and upgrade.running:
        return (
            f"a rolling upgrade is {upgrade.status} ({upgrade.in_progress} VM(s) in progress, "
            f"{upgrade.pending} pending); the app waits until rollingUpgrades/latest is no "
            "longer RollingForward (or cancel it with `az vmss rolling-upgrade cancel`)"
        )
    return None


def repairs_note(repairs: Any, health_timeout: timedelta) -> str:
    """What automatic repairs mean for a move, and the setting that changes it."""
    grace = int(repairs.grace_period.total_seconds() // 60)
    if not repairs.replaces_vms:
        return (
            f"{repairs.describe()}: a VM keeps its name when repaired; the app waits for it "
            "to report healthy again"
        )
    text = (
        f"{repairs.describe()}: a new VM still unhealthy {grace} minutes after it is created is "
        "replaced by the platform (new name, no event); the app follows the replacement "
        f"(operation step `{REPAIR_REASON}`) and waits for it to report healthy itself"
    )
    if repairs.grace_period < health_timeout:
        minutes = int(health_timeout.total_seconds() // 60)
        text += (
            f". The grace period is shorter than the app's {minutes}-minute health timeout: "
            "raise automaticRepairsPolicy.gracePeriod (up to PT90M) to give new VMs their "
            "full time"
        )
    return text


def _print_table(
    report: Mapping[str, Any],
    rows: Sequence[Any],
    left_out: Mapping[str, int],
    resource_groups: Sequence[str],
) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    cells = []
    for inventory, assessment, mode, held, wait in rows:
        zones = "\n".join(
            f"{zone}: {count.total}/{count.active}" for zone, count in assessment.zones.items()
        )
        moves = ", ".join(f"{m.source} {m.from_zone}->{m.to_zone}" for m in assessment.moves)
        cells.append(
            (
                inventory.scale_set.ref.name,
                inventory.scale_set.ref.resource_group,
                inventory.scale_set.mode.value,
                mode.value,
                zones,
                "yes" if assessment.balanced else "no",
                "skip" if held else ("wait" if wait else assessment.decision.value),
                AUTOSCALE_REASON if held else (UPGRADE_REASON if wait else assessment.reason.value),
                moves or "-",
            )
        )
    title = f"Zone balance in subscription {report['subscription']} (zones: total/active VMs)"
    if rows:
        print_table(console, title, AUDIT_COLUMNS, cells)
    else:
        console.print("No zonal scale sets in scope.")
    console.print(summary_line(len(rows), left_out, resource_groups))
    for entry, (inventory, assessment, _mode, held, wait) in zip(
        report["scaleSets"], rows, strict=True
    ):
        name = inventory.scale_set.ref.name
        if held:
            console.print(f"{name}: {AUTOSCALE_REASON}: {held.describe()}")
        elif wait:
            console.print(f"{name}: {UPGRADE_REASON}: {wait}")
        elif assessment.reason.value in DETAILED_REASONS:
            console.print(f"{name}: {assessment.reason.value}: {assessment.detail}")
        if entry.get("automaticRepairs"):
            console.print(f"{name}: automatic repairs: {entry['automaticRepairs']['note']}")
    for error in report.get("errors", ()):
        console.print(f"[red]not read[/red] {error['id']}: {error['kind']}: {error['message']}")


def summary_line(shown: int, left_out: Mapping[str, int], resource_groups: Sequence[str]) -> str:
    """What the table counts, and what it leaves out."""
    parts = [f"{shown} zonal scale set(s) in the table"]
    for key, what in (
        ("non_zonal", "not zonal (no zones: nothing to balance)"),
        ("out_of_scope", "outside the resource groups asked for"),
        ("unreadable", "unreadable (see the warnings)"),
    ):
        if left_out.get(key):
            parts.append(f"{left_out[key]} {what}")
    if resource_groups:
        parts.append(f"only resource group(s) {', '.join(resource_groups)} were read")
    return "; ".join(parts) + "."


def run(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    from rebalancer.compute import AdapterError
    from rebalancer.settings import OptIn, Settings

    env = os.environ if env is None else env
    # The SDK logs each failed credential attempt as a warning; the one-line error below says
    # what matters.
    logging.getLogger("azure").setLevel(logging.ERROR)
    subscription = args.subscription or default_subscription(env)
    if not subscription:
        raise CliError(
            "no subscription: pass --subscription ID, set AZURE_SUBSCRIPTION_ID, or pick a "
            "default with `az account set`"
        )
    opt_in = args.default_opt_in or env.get("REBALANCER_DEFAULT_OPT_IN") or "audit"
    try:
        settings = Settings(subscription_id=subscription, default_opt_in=OptIn(opt_in.lower()))
    except ValueError as error:
        raise CliError(
            f"REBALANCER_DEFAULT_OPT_IN={opt_in!r} is invalid: one of audit, enabled, disabled"
        ) from error
    adapter = _adapter(args, subscription, env)
    left_out: Counter[str] = Counter()
    with adapter:
        now = SystemClock().now()
        try:
            results = adapter.audit(args.resource_group or None, now=now, left_out=left_out)
        except AdapterError as error:
            loopback = adapter.config.loopback and not env.get(STATIC_TOKEN_ENV, "").strip()
            raise _fatal(error, subscription, adapter.config.endpoint, loopback=loopback) from error
        try:
            autoscale = adapter.autoscale_settings(fresh=True)
        except AdapterError as error:
            autoscale = ()
            print(
                f"autoscale settings not read ({error}); moves are reported without their "
                "autoscale maximum",
                file=sys.stderr,
            )
        upgrades = {}
        for result in results:
            if isinstance(result, AdapterError) or not result.scale_set.can_roll:
                continue
            try:  # one GET per scale set whose upgrade policy can roll
                upgrades[result.scale_set.ref.key] = adapter.latest_rolling_upgrade(
                    result.scale_set.ref
                )
            except AdapterError as error:
                ref = result.scale_set.ref
                print(f"rolling upgrade of {ref} not read ({error})", file=sys.stderr)
    report, rows = build_report(subscription, results, settings, autoscale, now, upgrades)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report, rows, left_out, args.resource_group or ())
    return EXIT_PARTIAL if report.get("errors") else EXIT_OK
