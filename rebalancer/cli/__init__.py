"""`python -m rebalancer <command>`.

Each command lives in its own module exposing `register(subparsers)`, which adds its parser
and sets `handler` to a function `(args) -> exit code`. Modules are imported only when
listed here, and each imports its heavy dependencies inside its handler.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("plan", "audit", "demo", "status")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rebalancer",
        description="Keep zonal VM scale sets evenly spread across availability zones.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"rebalancer.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CliError as error:
        print(f"rebalancer {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"rebalancer {args.command}: interrupted", file=sys.stderr)
        return 130
