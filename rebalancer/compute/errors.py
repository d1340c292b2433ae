"""Every failure of an Azure Compute call, reduced to what the caller must do about it.

`classify` works on the parts of an ARM error (HTTP status, error code, message, details,
Retry-After) wherever they come from: an HTTP error response, or the `error` of a long-running
operation that ended `Failed` (that is where `ZonalAllocationFailed` usually shows up).
`from_exception` turns the SDK's exceptions into `AdapterError`; nothing else leaves the adapter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from rebalancer.model import ScaleSetRef


class ErrorKind(StrEnum):
    """What the caller does next."""

    THROTTLED = "throttled"
    """Come back after `retry_after` seconds; nothing happened."""
    TRANSIENT = "transient"
    """Server or network trouble; retry on the next pass."""
    CONFLICT = "conflict"
    """Another operation is running on the resource, or ours was preempted; retry later."""
    NO_CAPACITY = "no_capacity"
    """The zone (`zone`, where known) has no capacity for the size: back off that zone."""
    QUOTA = "quota"
    """The subscription's vCPU quota would be exceeded: raise it or wait."""
    SKU_UNAVAILABLE = "sku_unavailable"
    """The size is not offered there for this subscription."""
    NOT_FOUND = "not_found"
    """The resource (or the subscription) does not exist."""
    FORBIDDEN = "forbidden"
    """The identity lacks a permission: `missing_action` names it."""
    UNAUTHENTICATED = "unauthenticated"
    """No usable credential (not logged in, expired or rejected token)."""
    INVALID = "invalid"
    """The request is wrong; retrying will not help."""


RETRYABLE = frozenset((ErrorKind.THROTTLED, ErrorKind.TRANSIENT, ErrorKind.CONFLICT))
"""The kinds of `AdapterError.retryable`."""

NO_CAPACITY_CODES = frozenset(
    code.lower()
    for code in (
        "ZonalAllocationFailed",
        "AllocationFailed",
        "OverconstrainedZonalAllocationRequest",
        "OverconstrainedAllocationRequest",
        "SkuNotAvailableInZone",
    )
)
QUOTA_CODES = frozenset(("quotaexceeded", "operationnotallowedquota"))
CONFLICT_CODES = frozenset(
    (
        "conflict",
        "anotheroperationinprogress",
        "operationpreempted",
        "concurrentrequestsnotallowed",
        "preconditionfailed",
    )
)
NOT_FOUND_CODES = frozenset(
    (
        "notfound",
        "resourcenotfound",
        "resourcegroupnotfound",
        "subscriptionnotfound",
        "parentresourcenotfound",
    )
)
FORBIDDEN_CODES = frozenset(
    ("authorizationfailed", "linkedauthorizationfailed", "linkedaccesscheckfailed", "forbidden")
)
UNAUTHENTICATED_CODES = frozenset(
    ("invalidauthenticationtoken", "expiredauthenticationtoken", "authenticationfailed")
)
TRANSIENT_CODES = frozenset(
    (
        "internalservererror",
        "internalexecutionerror",
        "serviceunavailable",
        "gatewaytimeout",
        "retryableerror",
        "requesttimeout",
        "connectionerror",
    )
)
TRANSIENT_STATUSES = frozenset((408, 500, 502, 503, 504))

_MISSING_ACTION = re.compile(
    r"does not have (?:authorization|permission) to perform action(?:\(s\))? '(?P<action>[^']+)'",
    re.IGNORECASE,
)
_ANY_ACTION = re.compile(r"action(?:\(s\))? '(?P<action>[^']+)'", re.IGNORECASE)
_ZONE = re.compile(r"\bzones?\b[^0-9A-Za-z]{0,4}(?P<zone>\d+)", re.IGNORECASE)


class AdapterError(Exception):
    """A failed Compute call, classified. The only exception the adapter raises."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        zone: str | None = None,
        missing_action: str | None = None,
        ref: ScaleSetRef | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.status = status
        self.request_id = request_id
        self.retry_after = retry_after
        self.zone = zone
        self.missing_action = missing_action
        self.ref = ref

    @property
    def retryable(self) -> bool:
        """The same call may succeed later (throttled, transient, a conflicting operation):
        an event is delivered again, an operation step is tried on the next pass."""
        return self.kind in RETRYABLE

    def __str__(self) -> str:
        parts = [f"{self.kind}"]
        if self.code:
            parts.append(f"({self.code})")
        parts.append(f": {self.message}")
        if self.retry_after is not None:
            parts.append(f" [retry after {self.retry_after:.0f} s]")
        if self.missing_action:
            parts.append(f" [missing permission {self.missing_action}]")
        if self.request_id:
            parts.append(f" [request id {self.request_id}]")
        return "".join(parts)

    def __repr__(self) -> str:
        return f"AdapterError({self})"

    def about(self, ref: ScaleSetRef) -> AdapterError:
        """The same error, naming the scale set it concerns."""
        self.ref = ref
        return self

    def to_record(self) -> dict[str, Any]:
        """Plain JSON for an operation record or a report."""
        record: dict[str, Any] = {"kind": str(self.kind), "message": self.message}
        for name in ("code", "status", "request_id", "retry_after", "zone", "missing_action"):
            value = getattr(self, name)
            if value is not None:
                record[name] = value
        if self.ref is not None:
            record["scale_set"] = self.ref.id
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AdapterError:
        ref = ScaleSetRef.parse(record["scale_set"]) if record.get("scale_set") else None
        return cls(
            ErrorKind(record["kind"]),
            record.get("message", ""),
            code=record.get("code"),
            status=record.get("status"),
            request_id=record.get("request_id"),
            retry_after=record.get("retry_after"),
            zone=record.get("zone"),
            missing_action=record.get("missing_action"),
            ref=ref,
        )


class ScaleSetGone(AdapterError):
    """The scale set does not exist (any more): stop working on it."""

    def __init__(self, ref: ScaleSetRef, *, request_id: str | None = None) -> None:
        super().__init__(
            ErrorKind.NOT_FOUND,
            f"scale set {ref.id} does not exist (deleted, or the id is wrong)",
            code="ResourceNotFound",
            status=404,
            request_id=request_id,
            ref=ref,
        )


def _detail_codes(details: Sequence[Mapping[str, Any]]) -> list[str]:
    codes: list[str] = []
    for detail in details or ():
        if isinstance(detail, Mapping):
            if detail.get("code"):
                codes.append(str(detail["code"]))
            codes.extend(_detail_codes(detail.get("details") or ()))
    return codes


def _detail_texts(details: Sequence[Mapping[str, Any]]) -> list[str]:
    texts: list[str] = []
    for detail in details or ():
        if isinstance(detail, Mapping):
            texts.extend(str(detail[k]) for k in ("message", "target") if detail.get(k))
            texts.extend(_detail_texts(detail.get("details") or ()))
    return texts


def _kind(status: int | None, code: str, message: str, detail_codes: list[str]) -> ErrorKind:
    codes = {code.lower(), *(c.lower() for c in detail_codes)}
    text = message.lower()
    if status == 429 or "toomanyrequests" in codes:
        return ErrorKind.THROTTLED
    if codes & NO_CAPACITY_CODES:
        return ErrorKind.NO_CAPACITY
    if "skunotavailable" in codes:
        return ErrorKind.SKU_UNAVAILABLE
    if codes & QUOTA_CODES or ("quota" in text and "operationnotallowed" in codes):
        return ErrorKind.QUOTA
    if codes & UNAUTHENTICATED_CODES or status == 401:
        return ErrorKind.UNAUTHENTICATED
    if codes & FORBIDDEN_CODES or status == 403:
        return ErrorKind.FORBIDDEN
    if codes & NOT_FOUND_CODES or status == 404:
        return ErrorKind.NOT_FOUND
    if codes & CONFLICT_CODES or "in progress" in text or status in (409, 412):
        return ErrorKind.CONFLICT
    if codes & TRANSIENT_CODES or (status is not None and status in TRANSIENT_STATUSES):
        return ErrorKind.TRANSIENT
    if status is not None and status >= 500:
        return ErrorKind.TRANSIENT
    return ErrorKind.INVALID


def classify(
    *,
    status: int | None,
    code: str | None,
    message: str | None,
    details: Sequence[Mapping[str, Any]] = (),
    retry_after: float | None = None,
    request_id: str | None = None,
) -> AdapterError:
    """Build the `AdapterError` for an ARM error's parts (HTTP status None for a failed LRO)."""
    code = code or ""
    message = message or (f"HTTP {status}" if status else "the operation failed")
    detail_codes = _detail_codes(details)
    kind = _kind(status, code, message, detail_codes)
    zone = None
    missing_action = None
    if kind is ErrorKind.NO_CAPACITY:
        for text in (message, *_detail_texts(details)):
            match = _ZONE.search(text)
            if match:
                zone = match["zone"]
                break
    if kind is ErrorKind.FORBIDDEN:
        match = _MISSING_ACTION.search(message) or _ANY_ACTION.search(message)
        missing_action = match["action"] if match else None
    if kind is ErrorKind.THROTTLED and code.lower() != "toomanyrequests":
        target = next(
            (d.get("target") for d in details if isinstance(d, Mapping) and d.get("target")), None
        )
        if target:
            message = f"{message} (policy {target})"
    return AdapterError(
        kind,
        message,
        code=code or None,
        status=status,
        request_id=request_id,
        retry_after=retry_after if kind is ErrorKind.THROTTLED else None,
        zone=zone,
        missing_action=missing_action,
    )


def parse_error_body(body: bytes | str | None) -> tuple[str | None, str | None, list[Any]]:
    """`{"error": {"code", "message", "details"}}` (or the bare inner object) -> its parts."""
    if not body:
        return None, None, []
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        return None, text.strip()[:500] or None, []
    if not isinstance(document, Mapping):
        return None, None, []
    error = document.get("error", document)
    if not isinstance(error, Mapping):
        return None, str(error), []
    details = error.get("details")
    return error.get("code"), error.get("message"), details if isinstance(details, list) else []


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (ARM sends delta-seconds); None when absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _header(headers: Any, name: str) -> str | None:
    if headers is None:
        return None
    try:
        return headers.get(name)
    except AttributeError:
        return None


def from_response(status: int, headers: Any, body: bytes | str | None) -> AdapterError:
    """Classify an HTTP error response (`headers` is any case-insensitive mapping)."""
    code, message, details = parse_error_body(body)
    return classify(
        status=status,
        code=code,
        message=message,
        details=details,
        retry_after=parse_retry_after(_header(headers, "Retry-After")),
        request_id=_header(headers, "x-ms-request-id"),
    )


def from_exception(error: BaseException) -> AdapterError:
    """Translate an azure-core / azure-identity exception; anything else is re-raised."""
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        DeserializationError,
        HttpResponseError,
        SerializationError,
        ServiceRequestError,
        ServiceResponseError,
    )

    if isinstance(error, AdapterError):
        return error
    if isinstance(error, HttpResponseError) and error.response is not None:
        response = error.response
        try:
            body = response.text()
        except Exception:  # a streamed or closed body: classify on the status alone
            body = None
        return from_response(response.status_code, response.headers, body)
    if isinstance(error, ClientAuthenticationError):
        return AdapterError(
            ErrorKind.UNAUTHENTICATED,
            f"could not get a token for Azure Resource Manager: {_first_line(error)}",
            code="CredentialUnavailable",
        )
    if isinstance(error, ServiceRequestError | ServiceResponseError):
        return AdapterError(
            ErrorKind.TRANSIENT,
            f"could not reach the Azure Resource Manager endpoint: {_first_line(error)}",
            code="ConnectionError",
        )
    if isinstance(error, AzureError):
        return AdapterError(ErrorKind.TRANSIENT, _first_line(error), code=type(error).__name__)
    if isinstance(error, DeserializationError | SerializationError):
        return AdapterError(
            ErrorKind.INVALID,
            f"unexpected response from Azure Resource Manager: {_first_line(error)}",
            code=type(error).__name__,
        )
    raise error


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
