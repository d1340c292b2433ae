"""Error classification: every ARM failure shape -> what the caller must do.

The exceptions here are the SDK's own (`HttpResponseError` and kin) wrapped around real HTTP
responses with ARM's error bodies and headers, as azure-core builds them for a failed call.
"""

from __future__ import annotations

import json

import pytest
import requests
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.core.pipeline.transport import HttpRequest, RequestsTransportResponse
from azure.mgmt.core.exceptions import ARMErrorFormat

from rebalancer.compute.errors import (
    AdapterError,
    ErrorKind,
    classify,
    from_exception,
    parse_error_body,
)
from rebalancer.model import ScaleSetRef

URL = (
    "https://management.azure.com/subscriptions/s/resourceGroups/rg/providers/"
    "Microsoft.Compute/virtualMachineScaleSets/web?api-version=2026-04-01"
)


def http_error(
    status: int,
    body: object,
    headers: dict[str, str] | None = None,
    cls: type[HttpResponseError] = HttpResponseError,
) -> HttpResponseError:
    raw = requests.Response()
    raw.status_code = status
    raw._content = json.dumps(body).encode() if not isinstance(body, bytes) else body
    raw.headers.update({"Content-Type": "application/json; charset=utf-8", **(headers or {})})
    raw.url = URL
    response = RequestsTransportResponse(HttpRequest("PATCH", URL), raw)
    return cls(response=response, error_format=ARMErrorFormat)


def arm(code: str, message: str, details: list[dict] | None = None) -> dict:
    error: dict = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def test_429_with_retry_after_is_throttled() -> None:
    body = arm(
        "OperationNotAllowed",
        "The server rejected the request because too many requests have been received.",
        [{"code": "TooManyRequests", "target": "HighCostGet30Min", "message": "{...}"}],
    )
    error = from_exception(
        http_error(429, body, {"Retry-After": "1200", "x-ms-request-id": "req-1"})
    )
    assert error.kind is ErrorKind.THROTTLED
    assert error.retry_after == 1200
    assert error.request_id == "req-1"
    assert "HighCostGet30Min" in error.message


@pytest.mark.parametrize(
    ("status", "code", "message", "kind"),
    [
        (
            409,
            "SkuNotAvailable",
            "The requested size is currently not available.",
            "sku_unavailable",
        ),
        (
            409,
            "OperationNotAllowed",
            "Operation could not be completed as it results in exceeding approved "
            "standardDSv5Family Cores quota.",
            "quota",
        ),
        (409, "QuotaExceeded", "Quota exceeded.", "quota"),
        (409, "Conflict", "The request conflicts with the current state.", "conflict"),
        (
            409,
            "OperationNotAllowed",
            "Cannot modify extensions in the VM when the VM is not running: another operation "
            "is in progress.",
            "conflict",
        ),
        (409, "AnotherOperationInProgress", "Another operation is in progress", "conflict"),
        (404, "ResourceNotFound", "The Resource 'x' was not found.", "not_found"),
        (404, "SubscriptionNotFound", "The subscription 'x' could not be found.", "not_found"),
        (500, "InternalServerError", "An internal error occurred.", "transient"),
        (503, "ServiceUnavailable", "Try again.", "transient"),
        (400, "InvalidParameter", "Capacity must be non-negative.", "invalid"),
        (401, "ExpiredAuthenticationToken", "The access token expiry...", "unauthenticated"),
    ],
)
def test_http_errors_by_code(status: int, code: str, message: str, kind: str) -> None:
    error = from_exception(http_error(status, arm(code, message)))
    assert error.kind == kind
    assert error.code == code
    assert error.status == status
    assert error.retry_after is None


def test_authorization_failed_names_the_missing_action() -> None:
    message = (
        "The client 'a@b.c' with object id '123' does not have authorization to perform action "
        "'Microsoft.Compute/virtualMachineScaleSets/read' over scope '/subscriptions/s' or the "
        "scope is invalid. If access was recently granted, please refresh your credentials."
    )
    error = from_exception(http_error(403, arm("AuthorizationFailed", message)))
    assert error.kind is ErrorKind.FORBIDDEN
    assert error.missing_action == "Microsoft.Compute/virtualMachineScaleSets/read"


def test_linked_authorization_failed_names_the_linked_action() -> None:
    message = (
        "The client '123' with object id '123' has permission to perform action "
        "'Microsoft.Compute/virtualMachineScaleSets/write' on scope '/subscriptions/s/...'; "
        "however, it does not have permission to perform action(s) "
        "'Microsoft.Network/virtualNetworks/subnets/join/action' on the linked scope(s) "
        "'/subscriptions/s/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/v/"
        "subnets/default' (respectively) or the linked scope(s) are invalid."
    )
    error = from_exception(http_error(403, arm("LinkedAuthorizationFailed", message)))
    assert error.kind is ErrorKind.FORBIDDEN
    assert error.code == "LinkedAuthorizationFailed"
    assert error.missing_action == "Microsoft.Network/virtualNetworks/subnets/join/action"


def test_sdk_subclasses_are_classified_on_their_response() -> None:
    error = from_exception(
        http_error(404, arm("ResourceNotFound", "gone"), cls=ResourceNotFoundError)
    )
    assert error.kind is ErrorKind.NOT_FOUND
    error = from_exception(
        http_error(401, arm("InvalidAuthenticationToken", "bad"), cls=ClientAuthenticationError)
    )
    assert error.kind is ErrorKind.UNAUTHENTICATED


def test_credential_and_connection_failures() -> None:
    not_logged_in = from_exception(
        ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token\nmore")
    )
    assert not_logged_in.kind is ErrorKind.UNAUTHENTICATED
    assert "\n" not in not_logged_in.message
    unreachable = from_exception(ServiceRequestError("Connection refused"))
    assert unreachable.kind is ErrorKind.TRANSIENT and unreachable.code == "ConnectionError"


def test_non_json_body_still_classified_by_status() -> None:
    error = from_exception(http_error(502, b"<html>Bad Gateway</html>"))
    assert error.kind is ErrorKind.TRANSIENT
    assert "Bad Gateway" in error.message


def test_failed_long_running_operation_with_zonal_allocation_failure() -> None:
    error = classify(
        status=None,
        code="ZonalAllocationFailed",
        message="Allocation failed. We do not have sufficient capacity for the requested VM "
        "size in this zone.",
        details=[{"code": "ZonalAllocationFailed", "target": "zone 2", "message": "zone: 2"}],
    )
    assert error.kind is ErrorKind.NO_CAPACITY
    assert error.zone == "2"
    overconstrained = classify(
        status=None,
        code="OverconstrainedZonalAllocationRequest",
        message="Allocation failed. VM(s) with the following constraints cannot be allocated, "
        "because the condition is too restrictive: Zones '3'.",
    )
    assert overconstrained.kind is ErrorKind.NO_CAPACITY and overconstrained.zone == "3"


def test_nested_detail_codes_count() -> None:
    body = arm(
        "DeploymentFailed",
        "At least one resource deployment operation failed.",
        [{"code": "Conflict", "details": [{"code": "AllocationFailed", "message": "..."}]}],
    )
    code, message, details = parse_error_body(json.dumps(body))
    assert code == "DeploymentFailed"
    assert classify(status=None, code=code, message=message, details=details).kind == (
        ErrorKind.NO_CAPACITY
    )


def test_records_round_trip() -> None:
    ref = ScaleSetRef("s", "rg", "web")
    error = AdapterError(ErrorKind.THROTTLED, "slow down", retry_after=30.0, code="X", ref=ref)
    again = AdapterError.from_record(json.loads(json.dumps(error.to_record())))
    assert (again.kind, again.retry_after, again.code, again.ref) == (
        ErrorKind.THROTTLED,
        30.0,
        "X",
        ref,
    )
    assert "retry after 30 s" in str(again)


def test_programming_errors_are_not_swallowed() -> None:
    with pytest.raises(KeyError):
        from_exception(KeyError("bug"))
