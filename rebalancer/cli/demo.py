"""`rebalancer demo`: the whole product on this machine, no Azure account needed.

The demo is part of the dev kit (devkit/demo.py, devkit/demo_cli.py), which lives beside the
app in a clone of the project and is not deployed; this module only finds it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from rebalancer.cli import CliError


def _demo_cli() -> ModuleType | None:
    """devkit.demo_cli, from the clone this package lives in; None where there is none."""
    try:
        return importlib.import_module("devkit.demo_cli")
    except ModuleNotFoundError as error:
        if error.name not in ("devkit", "devkit.demo_cli"):
            raise
    root = Path(__file__).resolve().parents[2]
    if not (root / "devkit" / "demo_cli.py").is_file():
        return None
    sys.path.insert(0, str(root))
    return importlib.import_module("devkit.demo_cli")


def register(subparsers: argparse._SubParsersAction) -> None:
    module = _demo_cli()
    if module is not None:
        module.register(subparsers)
        return
    parser = subparsers.add_parser("demo", help="the demo (needs a clone of the project)")
    parser.set_defaults(handler=_missing)


def _missing(args: argparse.Namespace) -> int:
    raise CliError(
        "the demo runs from a clone of the project (its devkit/ directory is not here): "
        "git clone the repository and run `make demo`"
    )
