"""`rebalancer status` against Azurite, with records of real operations.

The records come from the real stack (armsim through azure-mgmt-compute, Azurite through
azure-data-tables): one scale set is moved to the end, another is left mid-operation, and a
zone is backed off, then the command reads the same tables.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from armsim import ScaleSetSpec, Scenario
from devkit.stack import running_stack
from rebalancer import operation as op
from rebalancer.cli import EXIT_OK, EXIT_USAGE, CliError, build_parser, main, status
from rebalancer.model import ScaleSetRef
from rebalancer.store import Store

ENABLED = {"zone-rebalance": "enabled"}


@dataclass(frozen=True)
class Fleet:
    env: dict[str, str]
    prefix: str
    web: ScaleSetRef
    api: ScaleSetRef
    finished: op.OperationRecord
    in_flight: op.OperationRecord
    now: object


@pytest.fixture
def fleet(store: Store, azurite, table_prefix: str) -> Iterator[Fleet]:
    scenario = Scenario(
        scale_sets=(
            ScaleSetSpec("web", "rg-web", counts={"1": 1, "2": 3, "3": 3}, tags=ENABLED),
            ScaleSetSpec("api", "rg-api", counts={"1": 3, "2": 3, "3": 1}, tags=ENABLED),
        )
    )
    with running_stack(scenario, store) as stack:
        web = ScaleSetRef.parse(stack.sim.scale_set("rg-web", "web").id)
        api = ScaleSetRef.parse(stack.sim.scale_set("rg-api", "api").id)
        reconciler = stack.reconciler()
        reconciler.reconcile(web)
        for _ in range(120):
            if store.active_operation(web.key) is None:
                break
            stack.sim.advance(30)
            reconciler.reconcile(web)
        reconciler.reconcile(api)  # started, left in flight
        store.record_capacity_failure("westeurope", "Standard_D2s_v5", "2", stack.sim.clock.now())
        (finished,) = store.history(web.key)
        in_flight = store.active_operation(api.key)
        assert in_flight is not None
        yield Fleet(
            env={"AzureWebJobsStorage": azurite.connection_string},
            prefix=table_prefix,
            web=web,
            api=api,
            finished=op.OperationRecord.from_json(finished.body),
            in_flight=op.OperationRecord.from_json(in_flight.body),
            now=stack.sim.clock.now(),
        )


def args_of(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["status", *argv])


def run_json(fleet: Fleet, capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    args = args_of("--table-prefix", fleet.prefix, "--json", *argv)
    assert status.run(args, fleet.env, now=fleet.now) == EXIT_OK
    return json.loads(capsys.readouterr().out)


def test_json_lists_in_flight_operations_history_and_backoffs(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_json(fleet, capsys)
    (running,) = report["inFlight"]
    assert running["scaleSetId"] == fleet.api.id
    assert running["operationId"] == fleet.in_flight.operation_id
    assert running["state"] == "scaling_out"
    assert running["ageSeconds"] >= 0
    assert running["nextStep"] == op.describe(fleet.in_flight, fleet.now)
    assert running["targetZones"] == ["3"]
    (done,) = report["history"][fleet.web.id]
    assert done["operationId"] == fleet.finished.operation_id
    assert done["state"] == "succeeded"
    assert done["outcome"] == "moves_done"
    assert done["durationSeconds"] > 0
    assert "steps" not in done  # the overview stays short
    (backoff,) = report["backoffs"]
    assert (backoff["location"], backoff["sku"], backoff["zone"]) == (
        "westeurope",
        "standard_d2s_v5",
        "2",
    )
    assert backoff["failures"] == 1


def test_one_scale_set_shows_every_step_and_the_arm_request_ids(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_json(fleet, capsys, "--scale-set", fleet.web.id)
    assert report["scaleSetId"] == fleet.web.id
    # assessed again by the pass that finished the move: balanced now
    assert report["lastAssessment"]["decision"] == "none"
    assert report["lastAssessment"]["balanced"] is True
    (operation,) = report["operations"]
    assert [s["state"] for s in operation["steps"]] == [
        t.state.value for t in fleet.finished.history
    ]
    assert operation["armCalls"] == list(fleet.finished.arm_calls)
    assert any(call.startswith("set_capacity:") for call in operation["armCalls"])
    assert any(call.startswith("delete_instances:") for call in operation["armCalls"])
    assert operation["sources"] == list(fleet.finished.sources)
    # the id may be typed in any case, as Azure ids are
    upper = run_json(fleet, capsys, "--scale-set", fleet.web.id.upper())
    assert len(upper["operations"]) == 1


def test_tables_by_default(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "220")
    args = args_of("--table-prefix", fleet.prefix)
    assert status.run(args, fleet.env, now=fleet.now) == EXIT_OK
    out = capsys.readouterr().out
    assert "Operations in flight" in out
    assert "rg-api/api" in out and "scaling_out" in out
    assert "Recent operations" in out and "rg-web/web" in out and "succeeded" in out
    assert "Zones backed off" in out and "standard_d2s_v5" in out
    args = args_of("--table-prefix", fleet.prefix, "--scale-set", fleet.web.id)
    assert status.run(args, fleet.env, now=fleet.now) == EXIT_OK
    out = capsys.readouterr().out
    assert f"Operation {fleet.finished.operation_id}: succeeded" in out
    assert "new_vms_healthy" in out
    assert "ARM calls" in out and fleet.finished.arm_calls[0] in out


def test_tables_read_in_an_80_column_terminal(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    for extra in ((), ("--scale-set", fleet.web.id), ("--scale-set", fleet.api.id)):
        args = args_of("--table-prefix", fleet.prefix, *extra)
        assert status.run(args, fleet.env, now=fleet.now) == EXIT_OK
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()) <= 80, out
        assert "…" not in out, out
        if not extra:  # reason codes and states whole, each in its own column
            for whole in ("scaling_out", "succeeded", "moves_done", "standard_d2s_v5"):
                assert whole in out, (whole, out)
        elif extra[1] == fleet.web.id:
            for whole in ("new_vms_healthy", "moves_done", "awaiting_health"):
                assert whole in out, (whole, out)


def test_connection_string_flag_and_empty_tables(
    azurite, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["status", "--connection-string", azurite.connection_string]
    assert main([*argv, "--table-prefix", "nothinghere", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["inFlight"] == [] and report["history"] == {} and report["backoffs"] == []


def test_mistakes_are_reported_with_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CliError, match="not a scale set resource id"):
        status.run(args_of("--scale-set", "web"), {"AzureWebJobsStorage": "x=y"})
    with pytest.raises(CliError, match="no storage connection") as caught:
        status.run(args_of(), {})
    assert caught.value.exit_code == EXIT_USAGE
    assert "--connection-string" in str(caught.value)
    with pytest.raises(CliError, match="must start with https://"):
        status.run(args_of("--table-endpoint", "http://acct.table.core.windows.net"), {})


def test_an_unreachable_account_fails_with_what_to_check() -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cs = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
        f"KBHBeksoGMGw==;TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    with pytest.raises(CliError, match="Table Storage") as caught:
        status.run(args_of("--connection-string", cs), {})
    assert caught.value.exit_code == 1
    assert "retry" in str(caught.value)
