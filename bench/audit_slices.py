"""Figure 10: an audit larger than one invocation (5,000 scale sets x 100 VMs).

armsim runs in its own process (`python -m armsim serve --throttling`), Azurite in its own,
and the app in a fresh child process (`python -m bench.audit_slices child`): the real timer
and follow-up functions of `function_app.py`, the Reconciler, the Compute adapter at the
default 20% share of Compute's budget, the Store, the follow-up queue (Azurite's queue service),
with the invocation limit of the project's host.json. A slice that runs out of time sends a
continuation on the queue; it is delivered to the queue function after the host's longest
queue polling interval (host.json `extensions.queues.maxPollingInterval`: the worst case).
Without one, the timer fires every 5 minutes (the default schedule); an invocation still
running at an occurrence delays the next one to the first occurrence after it ends, as the
Functions timer does.

Time is armsim's wall clock, skipped ahead over every wait for the budget (the app's clock
moves armsim's with `POST /armsim/clock/advance`) and over the idle time between invocations:
the elapsed time is what the audit would take against Azure. The baseline is the budget floor
of the requests the audit sent (as in figure 1: per Azure policy, `(charged - share x burst) /
(share x refill)`), from armsim's request log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import Figure, armsim_process, budget_floor, fleet_document, mixed_fleet

ROOT = Path(__file__).resolve().parent.parent
TIMER = timedelta(minutes=5)
SHARE = 0.2
CHILD = ("-m", "bench.audit_slices")


class RemoteClock:
    """armsim's wall clock seen from another process: real time plus the skips, which move
    armsim's clock too, so its throttling buckets refill exactly as the app waited."""

    def __init__(self, endpoint: str, ca_cert: str) -> None:
        import requests

        self._session = requests.Session()
        self._verify = ca_cert  # per request: REQUESTS_CA_BUNDLE would override the session's
        self._endpoint = endpoint.rstrip("/")
        answer = self._session.get(
            f"{self._endpoint}/armsim/clock", verify=ca_cert, timeout=30
        ).json()
        self._origin = datetime.fromisoformat(answer["now"].replace("Z", "+00:00")[:26] + "+00:00")
        self._mono = time.monotonic()
        self._offset = 0.0

    def now(self) -> datetime:
        return self._origin + timedelta(seconds=time.monotonic() - self._mono + self._offset)

    def advance(self, seconds: float) -> datetime:
        if seconds > 0:
            self._offset += seconds
            self._session.post(
                f"{self._endpoint}/armsim/clock/advance",
                params={"seconds": f"{seconds:.6f}"},
                verify=self._verify,
                timeout=30,
            ).raise_for_status()
        return self.now()


def queue_polling_interval(path: Path = ROOT / "host.json") -> timedelta:
    """The queue trigger's longest wait between polls of an empty queue (the Functions
    host's default: one minute)."""
    document = json.loads(path.read_text())
    raw = document.get("extensions", {}).get("queues", {}).get("maxPollingInterval")
    if raw is None:
        return timedelta(minutes=1)
    hours, minutes, seconds = (float(part) for part in str(raw).split(":"))
    return timedelta(hours=hours, minutes=minutes, seconds=seconds)


def child(info: dict[str, Any], max_ticks: int) -> dict[str, Any]:
    """Run timer invocations, and the continuations they send, until the audit pass is done;
    report each slice and peak RSS."""
    from azure.storage.queue import QueueClient, TextBase64DecodePolicy

    from armsim import SimCredential
    from armsim.scenario import DEFAULT_TENANT
    from bench.memory import _peak_rss_mb
    from devkit.host import Host
    from devkit.tables import create_tables
    from rebalancer import service
    from rebalancer.clock import VirtualTime
    from rebalancer.compute import ArmConfig, ComputeAdapter
    from rebalancer.follow_up_queue import FollowUpQueue
    from rebalancer.settings import load_settings
    from rebalancer.store import StorageConnection, Store

    clock = RemoteClock(info["endpoint"], info["ca_cert"])
    settings = load_settings(
        {
            "REBALANCER_SUBSCRIPTION_ID": info["subscription_id"],
            "REBALANCER_MODE": "enforce",
            "REBALANCER_APP_PRINCIPAL_ID": info["app_principal_id"],
            "REBALANCER_ARM_ENDPOINT": info["endpoint"],
            "REBALANCER_ARM_BUDGET_SHARE": str(SHARE),
        }
    )
    limit = service._host_function_timeout()
    settings = _with_limit(settings, limit if not info.get("limit") else info["limit"])
    config = ArmConfig.from_settings(
        settings,
        ca_cert=info["ca_cert"],
        credential_scopes=("https://management.azure.com/.default",),
    )
    credential = SimCredential(info["app_principal_id"], DEFAULT_TENANT)
    store = Store(
        StorageConnection("bench", connection_string=info["storage"]),
        table_prefix=info["table_prefix"],
        retry_total=0,
    )
    create_tables(store)
    compute = ComputeAdapter(config, credential=credential, clock=VirtualTime(clock))
    follow_ups = FollowUpQueue(settings.follow_up_queue, connection_string=info["queue"])
    inbox = QueueClient.from_connection_string(
        info["queue"], settings.follow_up_queue, message_decode_policy=TextBase64DecodePolicy()
    )
    polling = queue_polling_interval()
    runtime = service.build_runtime(
        settings, store=store, compute=compute, clock=compute.clock, follow_ups=follow_ups
    )
    reconciler = runtime.reconciler
    slices: list[dict[str, Any]] = []
    assessed: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    audit_slice = reconciler.audit_slice

    def recorded(deadline: datetime | None = None, continuing: Any = None) -> Any:
        began = clock.now()
        done = audit_slice(deadline, continuing)
        for result in done.results:
            if result.verdict is not None or str(result.outcome) == "advanced":
                assessed[result.ref.key] += 1
            else:
                missed[str(result.outcome)] += 1
        slices.append(
            {
                "began": began.isoformat(),
                "ended": clock.now().isoformat(),
                "scale_sets": len(done.results),
                "done": done.done,
            }
        )
        return done

    reconciler.audit_slice = recorded  # type: ignore[method-assign]
    host = Host(runtime)
    _ = compute.client
    idle_rss = _peak_rss_mb()
    first = clock.now()
    invocations = []
    triggers: list[str] = []
    gaps: list[float] = []
    message = None
    cpu = time.process_time()
    try:
        for _ in range(max_ticks):
            began = clock.now()
            if message is not None:
                triggers.append("queue")
                host.follow_up(message.content, message.id)
                inbox.delete_message(message)
            else:
                triggers.append("timer")
                host.timer()
            ended = clock.now()
            invocations.append((ended - began).total_seconds())
            if slices and slices[-1]["done"]:
                break
            message = inbox.receive_message()
            if message is not None:
                clock.advance(polling.total_seconds())
            else:  # the next timer occurrence after this invocation ended
                periods = (clock.now() - first) // TIMER + 1
                clock.advance((first + periods * TIMER - clock.now()).total_seconds())
            gaps.append((clock.now() - ended).total_seconds())
    finally:
        compute.close()
        store.close()
        follow_ups.close()
        inbox.close()
    limit = settings.function_timeout
    return {
        "latency": info["latency"],
        "concurrency": config.audit_concurrency,
        "limit": limit.total_seconds() if limit is not None else None,
        "slices": slices,
        "invocations": invocations,
        "triggers": triggers,
        "gaps": gaps,
        "assessed_once": sum(1 for n in assessed.values() if n == 1),
        "assessed_twice": sum(1 for n in assessed.values() if n > 1),
        "not_assessed": dict(missed),
        "rss_mb": _peak_rss_mb(),
        "idle_rss_mb": idle_rss,
        "cpu_seconds": time.process_time() - cpu,
    }


def _with_limit(settings: Any, limit: Any) -> Any:
    from dataclasses import replace

    if isinstance(limit, int | float):
        limit = timedelta(seconds=limit)
    return replace(settings, function_timeout=limit)


def _requests(info: dict[str, Any]) -> list[Any]:
    import requests

    answer = requests.get(
        f"{info['endpoint'].rstrip('/')}/armsim/requests", verify=info["ca_cert"], timeout=300
    )
    answer.raise_for_status()
    return [
        SimpleNamespace(
            operation=r["operation"], path=r["path"], status=r["status"], policies=r["policies"]
        )
        for r in answer.json()
    ]


def run(
    *,
    scale_sets: int = 5000,
    vms: int = 100,
    latency: float = 0.02,
    limit: float | None = None,
    timeout: float = 7200.0,
) -> list[Figure]:
    from devkit.azurite import Azurite, AzuriteQueue

    fleet = mixed_fleet(scale_sets, vms)
    options = ("--throttling", "--latency", str(latency))
    with (
        Azurite() as azurite,
        AzuriteQueue() as queue,
        armsim_process(fleet_document(fleet), options=options, startup=1800) as info,
    ):
        info = {
            **info,
            "storage": azurite.connection_string,
            "queue": queue.connection_string,
            "table_prefix": f"slices{int(time.time())}",
            "limit": limit,
            "latency": latency,
        }
        started = time.perf_counter()
        command = [sys.executable, *CHILD, "child", json.dumps(info)]
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"audit child failed ({done.returncode}): {done.stderr[-3000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        for number, piece in enumerate(report["slices"], 1):
            print(f"# slice {number}: {json.dumps(piece)}", file=sys.stderr, flush=True)
        requests = _requests(info)
        real = time.perf_counter() - started
    return figures(report, requests, scale_sets=scale_sets, vms=vms, real=real)


def figures(
    report: dict[str, Any], requests: list[Any], *, scale_sets: int, vms: int, real: float
) -> list[Figure]:
    slices = report["slices"]
    if not slices or not slices[-1]["done"]:
        raise RuntimeError(f"the audit pass did not finish: {slices}")
    began = datetime.fromisoformat(slices[0]["began"])
    ended = datetime.fromisoformat(slices[-1]["ended"])
    seconds = (ended - began).total_seconds()
    budget, policy = budget_floor(requests, SHARE)
    latency_floor = len(requests) * report["latency"] / report["concurrency"]
    floor = max(budget, latency_floor)
    policy = (
        f"budget {policy} at {SHARE:g}"
        if budget >= latency_floor
        else "requests x latency / concurrency"
    )
    limit = report["limit"]
    longest = max(report["invocations"])
    triggers = Counter(report["triggers"])
    fleet = f"{scale_sets} sets x {vms} VMs ({scale_sets * vms} VMs, Uniform and Flexible)"
    throttled = sum(1 for r in requests if r.status == 429)
    not_assessed = report["not_assessed"]
    named = sum(not_assessed.values())
    accounted = report["assessed_once"] + named
    return [
        Figure(
            "audit_slices.total_time",
            round(seconds, 1),
            "s",
            round(floor, 1),
            "<=1.1x_floor",
            floor > 0 and seconds <= 1.1 * floor,
            detail=(
                f"{fleet}: {len(slices)} invocations ({triggers['timer']} by the timer, "
                f"{triggers['queue']} by a continuation; elapsed "
                + ", ".join(f"{s:.0f}" for s in report["invocations"])
                + " s; gaps "
                + (", ".join(f"{s:.0f}" for s in report["gaps"]) or "none")
                + " s), at most "
                f"{longest:.0f} s (limit {limit:.0f} s), {len(requests)} "
                f"requests, {throttled} 429s; floor: {policy}; "
                f"{real:.0f} s real here, {report['cpu_seconds']:.0f} s CPU in the app"
            ),
            baseline_label="budget floor",
        ),
        Figure(
            "audit_slices.peak_rss",
            round(report["rss_mb"], 1),
            "MB",
            round(report["idle_rss_mb"], 1),
            "<300MB",
            report["rss_mb"] < 300,
            detail=f"{fleet}: the app's process, armsim and Azurite in their own",
            baseline_label="runtime built, nothing read",
        ),
        Figure(
            "audit_slices.assessed_once",
            report["assessed_once"],
            "sets",
            scale_sets,
            "all_or_named",
            accounted == scale_sets and report["assessed_twice"] == 0,
            detail=(
                f"assessed more than once: {report['assessed_twice']}; not assessed: "
                + (", ".join(f"{n} {k}" for k, n in sorted(not_assessed.items())) or "none")
            ),
            baseline_label="scale sets",
        ),
    ]


def main(argv: list[str]) -> int:
    """`python -m bench.audit_slices [SETS [VMS]] [--limit SECONDS]`: with a smaller fleet, a
    smaller invocation limit keeps the number of invocations of the full figure."""
    import argparse

    if len(argv) >= 2 and argv[0] == "child":
        print(json.dumps(child(json.loads(argv[1]), max_ticks=200)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.audit_slices")
    parser.add_argument("sets", type=int, nargs="?", default=5000)
    parser.add_argument("vms", type=int, nargs="?", default=100)
    parser.add_argument(
        "--limit", type=float, default=None, help="invocation limit in seconds (default: host.json)"
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        parser.error(f"--limit must be a positive number of seconds, got {args.limit}")
    for figure in run(scale_sets=args.sets, vms=args.vms, limit=args.limit):
        print(figure.line())
        print(f"    {figure.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
