"""A write ARM accepted (`ArmCall`) and where it is (`OperationStatus`): plain values the
operation's Table row keeps, so that any later invocation can follow the write up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from rebalancer.compute.errors import AdapterError, ErrorKind, classify
from rebalancer.model import ScaleSetRef


class OperationState(StrEnum):
    IN_PROGRESS = "InProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class OperationStatus:
    """Where a started write is: in progress, succeeded, or failed with a classified error."""

    state: OperationState
    error: AdapterError | None = None
    retry_after: float | None = None
    """Seconds the status answer asked to wait before the next poll (`Retry-After`)."""
    failed_instances: tuple[tuple[str, str], ...] = ()
    """(instance id or VM name, code) of each `error.details` entry that names its `target`:
    how Compute says which VMs of a scale set write failed, and why."""

    @property
    def done(self) -> bool:
        return self.state is not OperationState.IN_PROGRESS


@dataclass(frozen=True, slots=True)
class ArmCall:
    """A write that was accepted by ARM, and what is needed to follow it up later.

    Plain data: `to_record()` goes into the operation's Table row before anything else
    happens, and `from_record()` gives it back in the next invocation.
    """

    action: str
    """`set_capacity` or `delete_instances`."""
    scale_set: str
    status_code: int
    capacity: int | None = None
    instance_ids: tuple[str, ...] = ()
    request_id: str | None = None
    correlation_id: str | None = None
    client_request_id: str | None = None
    """Our `x-ms-client-request-id`: Event Grid's `data.httpRequest.clientRequestId`."""
    async_operation_url: str | None = None
    location_url: str | None = None

    @property
    def ref(self) -> ScaleSetRef:
        return ScaleSetRef.parse(self.scale_set)

    @property
    def synchronous(self) -> bool:
        """ARM finished it in the request itself (no status to poll)."""
        return not (self.async_operation_url or self.location_url)

    def to_record(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "scale_set": self.scale_set,
            "status_code": self.status_code,
            "capacity": self.capacity,
            "instance_ids": list(self.instance_ids),
            "request_id": self.request_id,
            "correlation_id": self.correlation_id,
            "client_request_id": self.client_request_id,
            "async_operation_url": self.async_operation_url,
            "location_url": self.location_url,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ArmCall:
        return cls(
            action=record["action"],
            scale_set=record["scale_set"],
            status_code=int(record["status_code"]),
            capacity=record.get("capacity"),
            instance_ids=tuple(record.get("instance_ids") or ()),
            request_id=record.get("request_id"),
            correlation_id=record.get("correlation_id"),
            client_request_id=record.get("client_request_id"),
            async_operation_url=record.get("async_operation_url"),
            location_url=record.get("location_url"),
        )


def status_from_document(document: Any, ref: ScaleSetRef) -> OperationStatus:
    """The status of a write from ARM's answer at its `Azure-AsyncOperation` URL."""
    status = str((document or {}).get("status", "")).lower()
    if status in ("succeeded",):
        return OperationStatus(OperationState.SUCCEEDED)
    if status in ("failed", "canceled", "cancelled"):
        error = document.get("error") or {}
        code = error.get("code") or ("OperationPreempted" if status != "failed" else None)
        message = error.get("message") or f"the operation ended {document.get('status')}"
        classified = classify(
            status=None, code=code, message=message, details=error.get("details") or ()
        )
        if status != "failed" and classified.kind is ErrorKind.INVALID:
            classified.kind = ErrorKind.CONFLICT
        failed = tuple(
            (str(d["target"]), str(d["code"]))
            for d in error.get("details") or ()
            if isinstance(d, Mapping) and d.get("target") and d.get("code")
        )
        return OperationStatus(
            OperationState.FAILED, classified.about(ref), failed_instances=failed
        )
    return OperationStatus(OperationState.IN_PROGRESS)
