"""`rebalancer plan`: what the rebalancer would do with an exported scale set (what-if).

Reads a scale set (`az vmss show`, or the REST GET body) and its VMs (`az vmss
list-instances --expand instanceView`, `az vm list` for Flexible, or a REST list response)
and prints the evaluator's answer. It ignores the opt-in tag: it answers "what would happen
if the rebalancer were enabled here"; every other rule applies.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rebalancer.cli import EXIT_OK, CliError
from rebalancer.cli.tables import Column, print_table
from rebalancer.clock import SystemClock


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="show what the rebalancer would do with an exported scale set",
        description=(
            "Assess an exported scale set and its VMs: zone counts, whether it is balanced, "
            "and the moves the rebalancer would make (the opt-in tag is ignored)."
        ),
    )
    parser.add_argument(
        "--scale-set",
        required=True,
        type=Path,
        metavar="FILE",
        help="the scale set as JSON: `az vmss show` output or a REST GET response body",
    )
    parser.add_argument(
        "--instances",
        required=True,
        type=Path,
        metavar="FILE",
        help=(
            "its VMs as JSON: a bare array (`az vmss list-instances --expand instanceView`, "
            "`az vm list` for Flexible) or a REST list response {'value': [...]}"
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.set_defaults(handler=run)


def _load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise CliError(f"{path}: file not found") from error
    except IsADirectoryError as error:
        raise CliError(f"{path}: is a directory, not a JSON file") from error
    except UnicodeDecodeError as error:
        raise CliError(f"{path}: not UTF-8 text; export the JSON again") from error
    except OSError as error:
        raise CliError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CliError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from error


def _read_inputs(args: argparse.Namespace):
    from rebalancer.arm import (
        VM_TYPE,
        VM_TYPES,
        ArmParseError,
        instance_belongs_to,
        instance_documents,
        instance_scale_set,
        parse_instances,
        parse_scale_set,
    )
    from rebalancer.model import Inventory

    scale_path: Path = args.scale_set
    vms_path: Path = args.instances
    try:
        scale_set = parse_scale_set(_load(scale_path))
    except ArmParseError as error:
        raise CliError(f"{scale_path}: not a scale set: {error}") from error

    try:
        documents = instance_documents(_load(vms_path))
        for doc in documents:
            kind = str(doc.get("type") or VM_TYPE).lower()
            if kind in VM_TYPES and not instance_belongs_to(doc, scale_set.ref):
                owner = instance_scale_set(doc)
                where = f"scale set {owner.name!r}" if owner else "no scale set"
                raise CliError(
                    f"{vms_path}: VM {doc.get('name') or doc.get('id')!r} belongs to {where}, "
                    f"not to {scale_set.ref.name!r}; export the VMs of this scale set only"
                )
        instances = parse_instances(documents, scale_set.mode)
    except ArmParseError as error:
        raise CliError(f"{vms_path}: not a VM list: {error}") from error
    return Inventory(scale_set, instances, observed_at=SystemClock().now())


def to_json(assessment) -> dict[str, Any]:
    """The documented `--json` object, and nothing more."""
    return {
        "balanced": assessment.balanced,
        "zones": {
            zone: {"total": count.total, "active": count.active}
            for zone, count in assessment.zones.items()
        },
        "decision": assessment.decision.value,
        "reason": assessment.reason.value,
        "moves": [
            {"fromZone": move.from_zone, "toZone": move.to_zone, "source": move.source}
            for move in assessment.moves
        ],
    }


ZONE_COLUMNS = (
    Column("zone", code=True),
    Column("total", code=True, justify="right"),
    Column("active", code=True, justify="right"),
    Column("total after", priority=1, code=True, justify="right"),
    Column("active after", priority=1, code=True, justify="right"),
)
MOVE_COLUMNS = (
    Column("#", priority=2, code=True, justify="right"),
    Column("from zone", code=True),
    Column("to zone", code=True),
    Column("source", code=True),
    Column("why this source", priority=1),
)


def _print_table(inventory, assessment) -> None:
    from rich.console import Console

    from rebalancer.model import PowerState

    console = Console(highlight=False)
    scale_set = inventory.scale_set
    tag = scale_set.tag("zone-rebalance") or "not set"
    console.print(
        f"[bold]{scale_set.ref.name}[/bold] (resource group {scale_set.ref.resource_group}, "
        f"{scale_set.mode.value}, {len(inventory.instances)} VMs; "
        f"zone-rebalance tag: {tag}, ignored by plan)",
    )

    projected: Mapping = assessment.projected
    zones = [
        (zone, str(count.total), str(count.active), str(after.total), str(after.active))
        for zone, count in assessment.zones.items()
        for after in (projected.get(zone, count),)
    ]
    print_table(console, "Zones", ZONE_COLUMNS, zones)

    verdict = "balanced" if assessment.balanced else "not balanced"
    console.print(
        f"[bold]{verdict}; decision: {assessment.decision.value}[/bold] ({assessment.reason.value})"
    )
    console.print(assessment.reason.describe())
    if assessment.detail:
        console.print(f"Detail: {assessment.detail}")
    blind = [i.id for i in inventory.instances if i.power_state is PowerState.UNKNOWN]
    if blind:
        console.print(
            f"Warning: {len(blind)} VM(s) have no power state (e.g. {blind[0]}): export them "
            "with their instance view (--expand instanceView), or they count as running."
        )
    if assessment.excluded:
        console.print("Not counted (being deleted or failed): " + ", ".join(assessment.excluded))
    if assessment.moves:
        by_id = inventory.by_id()
        moves = [
            (str(n), move.from_zone, move.to_zone, move.source, _why_source(by_id[move.source]))
            for n, move in enumerate(assessment.moves, start=1)
        ]
        print_table(console, "Moves, in order", MOVE_COLUMNS, moves)
        console.print(
            "Moves run create-before-delete: the replacement must be healthy before its "
            "source is deleted."
        )


def _why_source(instance) -> str:
    from rebalancer.model import Health

    if instance.health is not Health.HEALTHY:
        return f"health {instance.health.value}"
    if not instance.latest_model:
        return "not on the latest model"
    return "highest id among the rest"


def run(args: argparse.Namespace) -> int:
    from rebalancer.evaluator import assess

    inventory = _read_inputs(args)
    assessment = assess(inventory)
    if args.json:
        print(json.dumps(to_json(assessment), indent=2))
    else:
        _print_table(inventory, assessment)
    return EXIT_OK
