"""ARM error responses: `{"error": {"code", "message", "details"}}` with an HTTP status."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ErrorBody:
    code: str
    message: str
    target: str | None = None
    details: tuple[ErrorBody, ...] = ()

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.target is not None:
            body["target"] = self.target
        if self.details:
            body["details"] = [detail.to_json() for detail in self.details]
        return body


class ArmError(Exception):
    """A request ARM rejects synchronously. Raised inside the world, rendered by the server."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        target: str | None = None,
        details: tuple[ErrorBody, ...] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.body = ErrorBody(code, message, target, details)
        self.headers = dict(headers or {})

    @property
    def code(self) -> str:
        return self.body.code

    def to_json(self) -> dict[str, Any]:
        return {"error": self.body.to_json()}


@dataclass(frozen=True, slots=True)
class OperationFailure:
    """Why a long-running operation ended Failed or Canceled (its status resource's `error`)."""

    code: str
    message: str
    details: tuple[ErrorBody, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return ErrorBody(self.code, self.message, None, self.details).to_json()


def resource_not_found(resource_type: str, name: str, resource_group: str) -> ArmError:
    return ArmError(
        404,
        "ResourceNotFound",
        f"The Resource '{resource_type}/{name}' under resource group '{resource_group}' "
        "was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
    )


def resource_group_not_found(resource_group: str) -> ArmError:
    return ArmError(
        404, "ResourceGroupNotFound", f"Resource group '{resource_group}' could not be found."
    )


def entity_not_found() -> ArmError:
    return ArmError(404, "NotFound", "The entity was not found in this Azure location.")


def bad_request(message: str, code: str = "BadRequest", target: str | None = None) -> ArmError:
    return ArmError(400, code, message, target=target)
