"""Figure 4: cold start of the function app.

The app's modules are byte-compiled first, as the package build does (`PACKAGE_BYTECODE`, the
command of infra/hooks/prepackage.sh): the deployed package runs from a read-only mount, so
what it does not carry compiled is compiled again at every cold start.

Import time of `function_app` against a bare `import azure.functions`, each the median over
fresh Python processes (the Functions host imports the app in a fresh worker). Then the first
timer invocation of a fresh process (building the runtime: settings, Table Storage, the
Compute adapter and their SDKs, then one audit tick against armsim and Azurite) against the
same tick warm, an hour later in the same process. That process (`bench.cold_child`) imports
nothing of the app's runtime before the first tick is timed, so the tick pays every import
a new worker pays. Table Storage (Azurite) is reached over HTTPS, as in Azure, and the app
verifies armsim's and Azurite's certificates against certifi's bundle plus their CAs, so that
TLS costs what verifying Azure's costs.
The deployment has run before: an earlier process created the tables and stored the audit
an hour before, so both ticks do the same work (the same Table reads and writes, the same
ARM reads). A new deployment's very first tick (tables created, every scale set new to the
store) is measured too, in one more process.
Last, in one more fresh process, the modules the first tick imported, the libraries' and
then the app's: how much of the first tick is importing (the rest is first use: connections,
TLS, caches). The warm tick plus the libraries' imports alone is the least the first tick can
cost while it imports them (an app with no import cost of its own and nothing to set up).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench.common import Figure, armsim_process, fleet_document, mixed_fleet

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_BYTECODE = (
    "-m",
    "compileall",
    "-q",
    "--invalidation-mode",
    "checked-hash",
    "function_app.py",
    "rebalancer",
)
"""Arguments to Python that byte-compile the app as the package build does (the prepackage
hook runs `python3` with the same)."""
_IMPORT = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def import_seconds(module: str, runs: int, timeout: float = 60.0) -> list[float]:
    """Seconds `import module` takes in each of `runs` fresh interpreters."""
    times = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT.format(module=module)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        times.append(float(done.stdout.strip().splitlines()[-1]))
    return times


def compile_app() -> None:
    """Byte-compile the app's modules as the package build does (checked-hash .pyc beside
    the sources, used whatever the files' times)."""
    subprocess.run([sys.executable, *PACKAGE_BYTECODE], cwd=ROOT, check=True, timeout=120)


def azure_sized_bundle(own_cas: tuple[str, ...], directory: Path) -> Path:
    """A CA bundle that verifies armsim and Azurite as certifi's verifies
    management.azure.com and Azure Storage, at the same cost: certifi's certificates
    (requests' default bundle, what the app trusts in Azure) and the simulators' own CAs."""
    import certifi

    bundle = directory / "ca-bundle.pem"
    pems = [Path(certifi.where()).read_text(), *(Path(ca).read_text() for ca in own_cas)]
    bundle.write_text("\n".join(pems))
    return bundle


def storage_certificate(directory: Path) -> tuple[tuple[Path, Path], str]:
    """A certificate for Azurite on 127.0.0.1, so Table Storage is reached over HTTPS as in
    Azure: ((certificate, key) paths, the path of the CA that issued it)."""
    import trustme

    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    cert, key, ca = directory / "azurite.pem", directory / "azurite-key.pem", directory / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    authority.cert_pem.write_to_path(str(ca))
    return (cert, key), str(ca)


def _in_child(info: dict[str, Any], *, ticks: int, timeout: float) -> dict[str, Any]:
    """Run `bench.cold_child`; its Table Storage client trusts the bundle as the Compute
    adapter does (`info["ca_cert"]`), through the variable a deployment would set."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.cold_child", json.dumps(info), str(ticks)],
        cwd=ROOT,
        env={**os.environ, "REQUESTS_CA_BUNDLE": info["ca_cert"]},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cold start child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_TICK_IMPORTS = """\
import json, sys, time
import function_app
import armsim.clock, bench.wiring, devkit.host  # what the child imports before its first tick
seconds = {}
for part, names in json.loads(sys.argv[1]).items():
    begin = time.perf_counter()
    for name in names:
        try:
            __import__(name)
        except ImportError:  # an alias or an extension's helper, not importable by its name
            continue
    seconds[part] = time.perf_counter() - begin
print(json.dumps(seconds))
"""


def tick_imports(modules: list[str], timeout: float = 60.0) -> dict[str, float]:
    """Seconds a fresh process (in the child's state before its first tick) takes to import
    `modules`: first the libraries' (azure-core, azure-data-tables, urllib3 and what they
    import, none of which imports the app), then the app's own."""
    parts = {
        "libraries": [name for name in modules if not name.startswith("rebalancer")],
        "app": [name for name in modules if name.startswith("rebalancer")],
    }
    done = subprocess.run(
        [sys.executable, "-c", _TICK_IMPORTS, json.dumps(parts)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    seconds: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return {**seconds, "total": seconds["libraries"] + seconds["app"]}


def run(
    *, runs: int = 7, scale_sets: int = 10, vms: int = 6, timeout: float = 120.0
) -> list[Figure]:
    from devkit.azurite import Azurite

    compile_app()
    app = import_seconds("function_app", runs)
    bare = import_seconds("azure.functions", runs)
    fleet = mixed_fleet(scale_sets, vms, tags={"zone-rebalance": "enabled"})
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        storage_tls, storage_ca = storage_certificate(Path(tmp))
        with (
            Azurite(tls=storage_tls) as azurite,
            armsim_process(fleet_document(fleet)) as info,
        ):
            bundle = azure_sized_bundle((info["ca_cert"], storage_ca), Path(tmp))
            info = {**info, "ca_cert": str(bundle), "storage": azurite.connection_string}
            deployed = {**info, "prefix": f"c{uuid.uuid4().hex[:12]}"}
            _in_child(deployed, ticks=1, timeout=timeout)  # the deployment's earlier process
            invocation = _in_child({**deployed, "hours": 1}, ticks=2, timeout=timeout)
            fresh = {**info, "prefix": f"c{uuid.uuid4().hex[:12]}"}
            new = _in_child(fresh, ticks=1, timeout=timeout)
    imports = tick_imports(invocation["modules"])
    floor = (invocation["second"] + imports["libraries"]) / invocation["second"]
    app_median, bare_median = statistics.median(app), statistics.median(bare)
    return [
        Figure(
            "cold_start.import_function_app",
            round(app_median * 1000, 1),
            "ms",
            round(bare_median * 1000, 1),
            "<=1.5x",
            app_median <= 1.5 * bare_median,
            detail=(
                f"median of {runs} fresh processes each; baseline: bare import azure.functions "
                f"(function_app: {min(app) * 1000:.0f}-{max(app) * 1000:.0f} ms)"
            ),
            baseline_label="import azure.functions",
        ),
        Figure(
            "cold_start.first_invocation",
            round(invocation["first"] * 1000),
            "ms",
            round(invocation["second"] * 1000),
            "<=2x",
            invocation["first"] <= 2 * invocation["second"],
            detail=(
                "first timer tick in a fresh process (runtime built, SDKs imported, audit of "
                f"{scale_sets} sets x {vms} VMs an hour after an earlier process's); baseline: "
                "the same tick again, warm, an hour later. Table reads/writes, first / warm: "
                f"{'/'.join(map(str, invocation['first_tables']))} / "
                f"{'/'.join(map(str, invocation['second_tables']))}. The app's CPU time, "
                f"first / warm: {invocation['first_cpu'] * 1000:.0f} / "
                f"{invocation['second_cpu'] * 1000:.0f} ms "
                f"({invocation['first_cpu'] / invocation['second_cpu']:.2f}x). A new "
                f"deployment's first tick (tables created, every set new): "
                f"{new['first'] * 1000:.0f} ms, {new['first_cpu'] * 1000:.0f} ms CPU, "
                f"Table reads/writes {'/'.join(map(str, new['first_tables']))}. The first "
                f"tick's imports alone, in a fresh process: {imports['total'] * 1000:.0f} ms, "
                f"the libraries' {imports['libraries'] * 1000:.0f} ms and the app's "
                f"{imports['app'] * 1000:.0f} ms; the warm tick plus the libraries' imports "
                f"alone is {floor:.2f}x the warm tick, the least this ratio can be while the "
                "first tick imports them"
            ),
            baseline_label="second invocation",
        ),
    ]


def main(argv: list[str]) -> int:
    for figure in run():
        print(figure.line())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
