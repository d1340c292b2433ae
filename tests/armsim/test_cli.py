"""`python -m armsim serve`: one JSON line, a working endpoint, clean stop; bad files exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from azure.mgmt.compute import ComputeManagementClient

from armsim import SimCredential

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "scenarios" / "uniform-2-4-7.toml"


def run_armsim(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "armsim", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def test_serve_prints_endpoint_and_serves_the_sdk() -> None:
    process = run_armsim("serve", "--scenario", str(EXAMPLE), "--speed", "60")
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        info = json.loads(line)
        assert info["endpoint"].startswith("https://127.0.0.1:")
        assert Path(info["ca_cert"]).is_file()
        client = ComputeManagementClient(
            SimCredential(info["app_principal_id"], "tenant"),
            info["subscription_id"],
            base_url=info["endpoint"],
            credential_scopes=["https://management.azure.com/.default"],
            connection_verify=info["ca_cert"],
            retry_total=0,
        )
        web = client.virtual_machine_scale_sets.get("rg-web", "web")
        assert web.sku.capacity == 13
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0


def test_bad_scenario_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[scale_sets]]\nname = "a"\nresource_group = "r"\nmode = "Flex"\n')
    process = run_armsim("serve", "--scenario", str(bad))
    _, err = process.communicate(timeout=20)
    assert process.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "mode must be one of" in lines[0] and "bad.toml" in lines[0]


def test_check_validates_a_scenario() -> None:
    process = run_armsim("check", str(EXAMPLE))
    out, _ = process.communicate(timeout=20)
    assert process.returncode == 0
    assert json.loads(out)["vms"] == 13
