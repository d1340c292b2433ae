"""`python -m armsim serve --scenario FILE [--port N]`: serve a scenario until interrupted.

Prints one JSON line with the endpoint and the CA certificate to trust, then serves. A bad
scenario file gets one error line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence

from armsim.clock import VirtualClock, WallClock
from armsim.scenario import ScenarioError, load_scenario
from armsim.simulator import ArmSim


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m armsim", description="Simulated Microsoft.Compute API on loopback."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a scenario over HTTPS until interrupted")
    serve.add_argument("--scenario", required=True, help="scenario file (.toml or .json)")
    serve.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: free)")
    serve.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="wall-clock speed-up: 60 makes a minute of VM life pass in a second",
    )
    serve.add_argument(
        "--virtual-clock",
        action="store_true",
        help="freeze time at the scenario's start (nothing progresses; for inspection)",
    )
    serve.add_argument("--event-url", help="POST each Event Grid event to this URL")
    serve.add_argument("--throttling", action="store_true", help="enforce throttling buckets")
    serve.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    check = commands.add_parser("check", help="validate a scenario file and exit")
    check.add_argument("scenario", help="scenario file (.toml or .json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = args.scenario
    try:
        scenario = load_scenario(path)
    except ScenarioError as error:
        print(f"armsim: {error}", file=sys.stderr)
        return 2
    if args.command == "check":
        try:
            ArmSim(scenario)  # seeds the world: overrides must name VMs that exist
        except ValueError as error:
            print(f"armsim: {path}: {error}", file=sys.stderr)
            return 2
        print(
            json.dumps(
                {
                    "scenario": str(path),
                    "scale_sets": len(scenario.scale_sets),
                    "vms": sum(sum(s.counts.values()) for s in scenario.scale_sets),
                }
            )
        )
        return 0
    if args.speed <= 0:
        print("armsim: --speed must be positive", file=sys.stderr)
        return 2
    clock = VirtualClock(scenario.start) if args.virtual_clock else WallClock(args.speed)
    try:
        sim = ArmSim(
            scenario,
            clock=clock,
            port=args.port,
            latency=args.latency,
            event_url=args.event_url,
            throttling=True if args.throttling else None,
        )
        sim.serve()
    except ValueError as error:
        print(f"armsim: {path}: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"armsim: cannot listen on 127.0.0.1:{args.port}: {error.strerror}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(
        json.dumps(
            {
                "endpoint": sim.endpoint,
                "ca_cert": sim.ca_cert_path,
                "subscription_id": sim.subscription_id,
                "app_principal_id": scenario.app_principal_id,
                "clock": "virtual" if clock.virtual else f"wall x{args.speed:g}",
            }
        ),
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
