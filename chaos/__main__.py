"""`python -m chaos [--seed N] [--scenarios S] [--scenario NAME]`: run the chaos suite.

The last line is always
`chaos: <S> scenarios, <C> crashes, <F> faults, <B> bad inputs, <V> invariant violations,
<U> unbalanced at end`; each violation and unbalanced scale set is printed above it with the
command that replays its scenario. Exit status 0 only with no violation and nothing
unbalanced.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter

from chaos.harness import (
    KINDS,
    KNOWN_ISSUES,
    ScenarioResult,
    Summary,
    parse_scenario,
    run_scenarios,
    scenario_name,
)

DEFAULT_SEED = 20261120
DEFAULT_SCENARIOS = 500


def replay(result: ScenarioResult) -> str:
    return f"make chaos SEED={result.seed} SCENARIO={result.name}"


def report(result: ScenarioResult, out=sys.stdout) -> None:
    if result.harness_error:
        print(
            f"HARNESS ERROR scenario {result.name} seed {result.seed}: {result.harness_error}\n"
            f"    replay: {replay(result)}",
            file=out,
            flush=True,
        )
    for violation in result.violations:
        print(
            f"VIOLATION scenario {result.name} seed {result.seed} step {violation.step}: "
            f"{violation.describe()}\n    replay: {replay(result)}",
            file=out,
            flush=True,
        )
    for note in result.journal_notes:
        print(
            f"JOURNAL scenario {result.name} seed {result.seed}: {note}\n"
            f"    replay: {replay(result)}",
            file=out,
            flush=True,
        )
    for item in result.unbalanced:
        print(
            f"UNBALANCED scenario {result.name} seed {result.seed}: {item}\n"
            f"    replay: {replay(result)}",
            file=out,
            flush=True,
        )


def details(summary: Summary, seconds: float) -> list[str]:
    crashed: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for r in summary.results:
        crashed.update(r.crash_boundaries)
        seen.update(r.boundaries_seen)
        outcomes.update(r.outcomes)
    kinds = {b for b in seen if b.startswith(("before ", "after "))}
    died = {b for b in crashed if not b.startswith("(")}
    ops = ", ".join(
        f"{k.removeprefix('operation ')} {v}"
        for k, v in sorted(outcomes.items())
        if k.startswith("operation ")
    )
    t = summary.total
    return [
        f"chaos: {seconds:.0f} s; {t('steps') + t('end_ticks')} steps, {t('invocations')} "
        f"invocations ({t('races')} concurrent steps), {t('writes_checked')} app writes checked",
        f"chaos: crashes at {len(died)} distinct step boundaries of {len(kinds)} passed; "
        f"faults: {t('azure_faults')} from Azure, {t('storage_faults')} storage restarts or "
        f"outages; {t('actor_actions')} outside actions",
        f"chaos: events: {t('events_delivered')} delivered, {t('duplicates')} duplicated, "
        f"{t('redelivered')} redelivered after a failure, {t('bad_inputs')} hostile "
        f"({outcomes['undecodable']} undecodable by the host); "
        f"{t('transient')} transient failures handed back to the host",
        f"chaos: operations ended: {ops or 'none'}; the journal replay of devkit/invariants.py "
        f"objected {sum(len(r.journal_notes) for r in summary.results)} time(s)",
        f"chaos: platform actors: {outcomes['actor autoscale_engine']} autoscale settings, "
        f"{outcomes['actor rolling_upgrade']} rolling upgrades, {outcomes['actor repairs']} "
        f"repair policies ({outcomes['repairs made']} repairs made); "
        f"{outcomes['held at the autoscale maximum']} scale set(s) left alone at the autoscale "
        "maximum (autoscale_at_maximum)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--scenarios", type=int, default=DEFAULT_SCENARIOS, metavar="S")
    parser.add_argument(
        "--scenario", default=None, metavar="NAME", help="replay one scenario (e.g. 0017-races)"
    )
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=sorted(KNOWN_ISSUES),
        metavar="ISSUE",
        help="leave out the chaos that shows a known product bug "
        f"(open: {', '.join(KNOWN_ISSUES) or 'none'})",
    )
    parser.add_argument(
        "--jobs", type=int, default=3, help="processes, each with its own armsim and Azurite"
    )
    parser.add_argument("--verbose", action="store_true", help="show the app's own log")
    args = parser.parse_args(argv)
    if args.scenario:
        try:
            indices = [parse_scenario(args.scenario)]
        except ValueError as error:
            parser.error(str(error))
    else:
        if args.scenarios < 1:
            parser.error("--scenarios must be at least 1")
        indices = list(range(args.scenarios))
    logging.basicConfig(level=logging.INFO)
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    for noisy in ("azure", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.monotonic()
    done = 0

    def progress(result: ScenarioResult) -> None:
        nonlocal done
        done += 1
        report(result)
        if done % 50 == 0:
            print(f"chaos: {done}/{len(indices)} scenarios", file=sys.stderr, flush=True)

    print(
        f"chaos: seed {args.seed}, {len(indices)} scenario(s) "
        f"({', '.join(scenario_name(i) for i in indices[:1])}...; kinds: {', '.join(KINDS)})",
        flush=True,
    )
    summary = run_scenarios(
        args.seed,
        indices,
        jobs=args.jobs,
        without=frozenset(args.without),
        on_result=progress,
    )
    for line in details(summary, time.monotonic() - started):
        print(line)
    print(summary.line(), flush=True)
    failed = summary.violations or summary.unbalanced or summary.harness_errors
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
