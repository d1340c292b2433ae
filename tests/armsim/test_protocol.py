"""The HTTP contract checked on the wire: status codes, headers, auth, api-version, LRO URLs."""

from __future__ import annotations

import requests

from armsim import ArmSim
from armsim.auth import make_token
from tests.armsim.conftest import web_scenario


def call(sim: ArmSim, method: str, path: str, *, token: str | None = "", **kwargs):  # type: ignore[no-untyped-def]
    headers = kwargs.pop("headers", {})
    if token == "":
        token = make_token(sim.scenario.app_principal_id, sim.scenario.tenant_id)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(
        method, sim.endpoint + path, headers=headers, verify=sim.ca_cert_path, timeout=10, **kwargs
    )


def vmss_path(sim: ArmSim, name: str = "web", group: str = "rg-web") -> str:
    return (
        f"/subscriptions/{sim.subscription_id}/resourceGroups/{group}"
        f"/providers/Microsoft.Compute/virtualMachineScaleSets/{name}"
    )


def test_missing_api_version_is_400(sim: ArmSim) -> None:
    response = call(sim, "GET", vmss_path(sim))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "MissingApiVersionParameter"


def test_missing_or_malformed_authorization_is_401(sim: ArmSim) -> None:
    response = call(sim, "GET", vmss_path(sim) + "?api-version=2024-07-01", token=None)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "AuthenticationFailed"
    basic = call(
        sim,
        "GET",
        vmss_path(sim) + "?api-version=2024-07-01",
        token=None,
        headers={"Authorization": "Basic abc"},
    )
    assert basic.status_code == 401


def test_any_api_version_date_is_accepted_and_logged(sim: ArmSim) -> None:
    response = call(sim, "GET", vmss_path(sim) + "?api-version=2024-07-01")
    assert response.status_code == 200
    assert sim.requests[-1].api_version == "2024-07-01"
    bad = call(sim, "GET", vmss_path(sim) + "?api-version=latest")
    assert bad.json()["error"]["code"] == "InvalidApiVersionParameter"


def test_every_answer_carries_request_id_and_rate_limit_headers(sim: ArmSim) -> None:
    response = call(sim, "GET", vmss_path(sim) + "/virtualMachines?api-version=2024-07-01")
    assert response.headers["x-ms-request-id"]
    assert response.headers["x-ms-ratelimit-remaining-subscription-reads"] == "249"
    assert (
        "Microsoft.Compute/HighCostGetVMScaleSetResource;29"
        in (response.headers["x-ms-ratelimit-remaining-resource"])
    )


def test_patch_answers_200_with_async_operation_only(sim: ArmSim) -> None:
    """As the recorded capacity write (tests/data/real-azure) was answered: no Location."""
    response = call(
        sim, "PATCH", vmss_path(sim) + "?api-version=2024-07-01", json={"sku": {"capacity": 14}}
    )
    assert response.status_code == 200
    assert response.json()["properties"]["provisioningState"] == "Updating"
    assert "Location" not in response.headers
    status_url = response.headers["Azure-AsyncOperation"]
    assert status_url.startswith(sim.endpoint) and "api-version=2024-07-01" in status_url
    token = make_token(sim.scenario.app_principal_id, sim.scenario.tenant_id)
    auth = {"Authorization": f"Bearer {token}"}
    status = requests.get(status_url, headers=auth, verify=sim.ca_cert_path, timeout=10)
    assert status.json()["status"] == "InProgress"
    sim.clock.advance(60)
    done = requests.get(status_url, headers=auth, verify=sim.ca_cert_path, timeout=10).json()
    assert done["status"] == "Succeeded" and done["endTime"]


def test_location_only_mode_is_polled_through_the_monitor_url(make_sim) -> None:  # type: ignore[no-untyped-def]
    sim = make_sim(web_scenario(lro_headers="location", lro_retry_after=7))
    response = call(
        sim, "PATCH", vmss_path(sim) + "?api-version=2024-07-01", json={"sku": {"capacity": 14}}
    )
    assert response.status_code == 200 and "Azure-AsyncOperation" not in response.headers
    assert response.headers["Retry-After"] == "7"
    monitor_url = response.headers["Location"]
    assert "monitor=true" in monitor_url
    token = make_token(sim.scenario.app_principal_id, sim.scenario.tenant_id)
    auth = {"Authorization": f"Bearer {token}"}
    monitor = requests.get(monitor_url, headers=auth, verify=sim.ca_cert_path, timeout=10)
    assert monitor.status_code == 202 and monitor.headers["Retry-After"] == "7"
    sim.clock.advance(60)
    monitor = requests.get(monitor_url, headers=auth, verify=sim.ca_cert_path, timeout=10)
    assert monitor.status_code == 200 and monitor.json()["sku"]["capacity"] == 14
    assert "Retry-After" not in monitor.headers


def test_delete_instances_answers_202(sim: ArmSim) -> None:
    response = call(
        sim, "POST", vmss_path(sim) + "/delete?api-version=2024-07-01", json={"instanceIds": ["0"]}
    )
    assert response.status_code == 202
    assert response.content == b""
    assert "Azure-AsyncOperation" in response.headers and "Location" in response.headers


def test_unknown_paths_and_methods(sim: ArmSim) -> None:
    other = call(
        sim,
        "GET",
        f"/subscriptions/{sim.subscription_id}/resourceGroups/rg-web"
        "/providers/Microsoft.Compute/disks?api-version=2024-07-01",
    )
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "InvalidResourceType"
    wrong_sub = call(
        sim, "GET", vmss_path(sim).replace(sim.subscription_id, "nope") + "?api-version=2024-07-01"
    )
    assert wrong_sub.json()["error"]["code"] == "SubscriptionNotFound"
    method = call(sim, "POST", vmss_path(sim) + "?api-version=2024-07-01", json={})
    assert method.status_code == 405


def test_invalid_body_is_400(sim: ArmSim) -> None:
    response = call(sim, "PATCH", vmss_path(sim) + "?api-version=2024-07-01", data=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "InvalidRequestContent"
    negative = call(
        sim, "PATCH", vmss_path(sim) + "?api-version=2024-07-01", json={"sku": {"capacity": -1}}
    )
    assert negative.json()["error"]["code"] == "InvalidParameter"


def test_latency_option_slows_every_request(make_sim) -> None:  # type: ignore[no-untyped-def]
    sim = make_sim(latency=0.05)
    call(sim, "GET", vmss_path(sim) + "?api-version=2024-07-01")
    assert sim.requests[-1].duration_ms >= 50


def test_control_endpoints_move_the_clock_and_show_state(sim: ArmSim) -> None:
    def control(method: str, path: str):  # type: ignore[no-untyped-def]
        return requests.request(method, sim.endpoint + path, verify=sim.ca_cert_path, timeout=10)

    sim.actor.set_capacity("rg-web", "web", 14)
    assert control("GET", "/armsim/clock").json()["virtual"] is True
    moved = control("POST", "/armsim/clock/advance?seconds=60").json()
    assert moved["now"].startswith("2026-11-20T09:01:00")
    state = control("GET", "/armsim/state").json()["scaleSets"]
    web = next(s for s in state if s["id"].endswith("/web"))
    assert web["zones"] == {"1": 3, "2": 4, "3": 7}
    assert control("GET", "/armsim/events").json()[0]["eventType"].endswith("WriteSuccess")
    assert control("POST", "/armsim/clock/advance?seconds=x").status_code == 400
    assert control("GET", "/armsim/nothing").status_code == 404
