"""The Microsoft.Compute REST surface: routes, query parameters, LRO headers, paging.

`Api.handle(request)` turns one parsed HTTP request into a `Reply`. It holds the world's lock
only while it reads or changes state; waits (latency, slow faults) happen outside the lock.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from armsim import render
from armsim.auth import claims_from_token
from armsim.clock import iso
from armsim.errors import ArmError, bad_request, entity_not_found
from armsim.events import OBJECT_ID_CLAIM
from armsim.faults import REQUEST_KINDS
from armsim.resources import VM_TYPE, VMSS_TYPE, Caller, Operation
from armsim.throttling import throttle_error_for_fault
from armsim.world import check_if_match

if TYPE_CHECKING:
    from armsim.simulator import ArmSim

_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
_SUB = r"^/subscriptions/(?P<sub>[^/]+)"
_RG = _SUB + r"/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute"
_VMSS = _RG + r"/virtualMachineScaleSets/(?P<name>[^/]+)"
_VMSS_VM = _VMSS + r"/virtualMachines/(?P<instance>[^/]+)"
_VM = _RG + r"/virtualMachines/(?P<vm>[^/]+)"
_AUTOSCALE = (
    _SUB + r"/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Insights/autoscalesettings/"
    r"(?P<setting>[^/]+)"
)
_VM_FILTER = re.compile(
    r"^\s*'?virtualMachineScaleSet/id'?\s+eq\s+'(?P<id>[^']+)'\s*$", re.IGNORECASE
)

_LOCATION_FILTER = re.compile(r"^\s*location\s+eq\s+'(?P<loc>[^']+)'\s*$", re.IGNORECASE)

# (method, path pattern, operation name): the operation name keys faults, throttling, the log.
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p + "$", re.IGNORECASE), op)
    for m, p, op in (
        ("GET", _SUB + r"/providers/Microsoft\.Compute/virtualMachineScaleSets", "vmss.list_all"),
        (
            "GET",
            _SUB + r"/providers/Microsoft\.Compute/locations/(?P<loc>[^/]+)/usages",
            "usage.list",
        ),
        (
            "GET",
            _SUB + r"/providers/Microsoft\.Compute/locations/(?P<loc>[^/]+)/operations/"
            r"(?P<op>[^/]+)",
            "operation.status",
        ),
        ("GET", _SUB + r"/providers/Microsoft\.Compute/skus", "sku.list"),
        ("GET", _RG + r"/virtualMachineScaleSets", "vmss.list"),
        ("GET", _VMSS, "vmss.get"),
        ("PUT", _VMSS, "vmss.create_or_update"),
        ("PATCH", _VMSS, "vmss.update"),
        ("DELETE", _VMSS, "vmss.delete"),
        ("POST", _VMSS + r"/delete", "vmss.delete_instances"),
        ("GET", _VMSS + r"/instanceView", "vmss.get_instance_view"),
        ("GET", _VMSS + r"/rollingUpgrades/latest", "vmss.rolling_upgrade_latest"),
        ("GET", _VMSS + r"/virtualMachines", "vmss_vm.list"),
        ("GET", _VMSS_VM, "vmss_vm.get"),
        ("PUT", _VMSS_VM, "vmss_vm.update"),
        ("DELETE", _VMSS_VM, "vmss_vm.delete"),
        ("GET", _VMSS_VM + r"/instanceView", "vmss_vm.get_instance_view"),
        ("POST", _VMSS_VM + r"/deallocate", "vmss_vm.deallocate"),
        ("GET", _RG + r"/virtualMachines", "vm.list"),
        ("GET", _VM, "vm.get"),
        ("DELETE", _VM, "vm.delete"),
        ("GET", _VM + r"/instanceView", "vm.instance_view"),
        ("POST", _VM + r"/deallocate", "vm.deallocate"),
        ("GET", _SUB + r"/providers/Microsoft\.Insights/autoscalesettings", "autoscale.list"),
        ("GET", _AUTOSCALE, "autoscale.get"),
    )
]
WRITE_METHODS = frozenset({"PUT", "PATCH", "POST", "DELETE"})
# operation -> (event kind, operationName, which resource): what a refused write reports.
_EVENTS: dict[str, tuple[str, str, str]] = {
    "vmss.create_or_update": ("write", f"{VMSS_TYPE}/write", "vmss"),
    "vmss.update": ("write", f"{VMSS_TYPE}/write", "vmss"),
    "vmss.delete": ("delete", f"{VMSS_TYPE}/delete", "vmss"),
    "vmss.delete_instances": ("action", f"{VMSS_TYPE}/delete/action", "vmss"),
    "vmss_vm.update": ("write", f"{VMSS_TYPE}/virtualMachines/write", "vmss_vm"),
    "vmss_vm.delete": ("delete", f"{VMSS_TYPE}/virtualMachines/delete", "vmss_vm"),
    "vmss_vm.deallocate": ("action", f"{VMSS_TYPE}/virtualMachines/deallocate/action", "vmss_vm"),
    "vm.delete": ("delete", f"{VM_TYPE}/delete", "vm"),
    "vm.deallocate": ("action", f"{VM_TYPE}/deallocate/action", "vm"),
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    """Lower-cased header names."""
    body: bytes
    base_url: str
    client_ip: str = "127.0.0.1"

    @property
    def url(self) -> str:
        query = urllib.parse.urlencode(self.query, safe="/'$ ")
        return f"{self.base_url}{self.path}" + (f"?{query}" if query else "")


@dataclass(slots=True)
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    reset: bool = False
    """Close the connection without answering (connection reset fault)."""

    def payload(self) -> bytes:
        if self.body is None:
            return b""
        return json.dumps(self.body, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One entry of the request log."""

    time: datetime
    method: str
    path: str
    operation: str
    api_version: str | None
    status: int
    policies: tuple[str, ...]
    principal_id: str | None
    query: Mapping[str, str]
    duration_ms: float
    body: Any = None
    """The parsed JSON body of a write (PUT/PATCH/POST), for checks like "capacity set to N"."""


class Api:
    def __init__(self, sim: ArmSim) -> None:
        self.sim = sim
        self.world = sim.world

    # --- entry point --------------------------------------------------------------------

    def handle(self, request: Request) -> Reply:
        if request.path.startswith("/armsim/"):
            return self._control(request)
        started = time.perf_counter()
        operation = "unknown"
        params: dict[str, str] = {}
        caller: Caller | None = None
        policies: tuple[str, ...] = ()
        try:
            if self.sim.latency > 0:
                time.sleep(self.sim.latency)
            operation, params = self._route(request)
            caller = self._caller(request, self._authenticate(request))
            self._check_api_version(request)
            reply = self._faults(request, operation, caller.principal_id)
            if reply is None:
                self._advance_for_poll(operation, params)
                with self.world.lock:
                    self.world.settle(self.sim.clock.now())
                    headers, policies = self.sim.throttle.charge(
                        operation,
                        self.world.subscription_id,
                        _throttle_scope(request.path),
                        self.world.now,
                    )
                    reply = getattr(self, "_" + operation.replace(".", "_"))(
                        request, params, caller
                    )
                    reply.headers.update(headers)
        except ArmError as error:
            reply = Reply(error.status, error.to_json(), dict(error.headers))
            if error.status == 429:
                policies = policies or ("throttled",)
            self._report_refused(request, operation, params, caller, error)
        finally:
            self.sim.flush_events(raise_errors=False)
        reply.headers.setdefault("x-ms-request-id", self.world.new_id())
        correlation = (
            request.headers.get("x-ms-correlation-request-id") or reply.headers["x-ms-request-id"]
        )
        reply.headers.setdefault("x-ms-correlation-request-id", correlation)
        if "x-ms-client-request-id" in request.headers:
            reply.headers["x-ms-client-request-id"] = request.headers["x-ms-client-request-id"]
        self.sim.record(
            RequestRecord(
                time=self.world.now,
                method=request.method,
                path=request.path,
                operation=operation,
                api_version=request.query.get("api-version"),
                status=0 if reply.reset else reply.status,
                policies=policies,
                principal_id=caller.principal_id if caller else None,
                query=dict(request.query),
                duration_ms=(time.perf_counter() - started) * 1000.0,
                body=_logged_body(request),
            )
        )
        return reply

    def _control(self, request: Request) -> Reply:
        """armsim's own endpoints (not ARM): move the clock, look at the state and events.

        For people and other processes using `python -m armsim serve`; tests in the same
        process use the Python API instead.
        """
        path = request.path.rstrip("/")
        if path == "/armsim/clock" and request.method == "GET":
            return Reply(200, {"now": iso(self.sim.clock.now()), "virtual": self.sim.clock.virtual})
        if path == "/armsim/clock/advance" and request.method == "POST":
            try:
                seconds = float(request.query.get("seconds", ""))
            except ValueError:
                return Reply(400, bad_request("Give ?seconds=N (a number).").to_json())
            if seconds < 0:
                return Reply(400, bad_request("seconds must not be negative.").to_json())
            now = self.sim.clock.advance(seconds)
            return Reply(200, {"now": iso(now), "virtual": self.sim.clock.virtual})
        if path == "/armsim/state" and request.method == "GET":
            return Reply(200, {"scaleSets": [_view_json(view) for view in self.sim.state]})
        if path == "/armsim/events" and request.method == "GET":
            return Reply(200, list(self.sim.events))
        if path == "/armsim/requests" and request.method == "GET":
            return Reply(
                200,
                [
                    {
                        "operation": r.operation,
                        "path": r.path,
                        "status": r.status,
                        "policies": list(r.policies),
                    }
                    for r in self.sim.requests
                ],
            )
        return Reply(
            404,
            ArmError(
                404,
                "NotFound",
                "armsim serves GET /armsim/clock, POST /armsim/clock/advance?seconds=N, "
                "GET /armsim/state, GET /armsim/events and GET /armsim/requests.",
            ).to_json(),
        )

    def _report_refused(
        self,
        request: Request,
        operation: str,
        params: Mapping[str, str],
        caller: Caller | None,
        error: ArmError,
    ) -> None:
        """A write ARM authorized but refused (403, 409, 5xx) is reported as a Failure event."""
        if caller is None or request.method not in WRITE_METHODS:
            return
        if error.status not in (403, 409) and error.status < 500:
            return
        event = _EVENTS.get(operation)
        if event is None:
            return
        kind, name, level = event
        sub = f"/subscriptions/{params['sub']}/resourceGroups/{params['rg']}/providers"
        if level == "vm":
            resource_id = f"{sub}/{VM_TYPE}/{params['vm']}"
        else:
            resource_id = f"{sub}/{VMSS_TYPE}/{params['name']}"
            if level == "vmss_vm":
                resource_id += f"/virtualMachines/{params['instance']}"
        self.sim.emit_rejected(kind, name, resource_id, caller)

    def _route(self, request: Request) -> tuple[str, dict[str, str]]:
        path = request.path.rstrip("/")
        known_path = False
        for method, pattern, operation in ROUTES:
            match = pattern.match(path)
            if match is None:
                continue
            known_path = True
            if method == request.method:
                params = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
                if params["sub"].lower() != self.world.subscription_id.lower():
                    raise ArmError(
                        404,
                        "SubscriptionNotFound",
                        f"The subscription '{params['sub']}' could not be found.",
                    )
                return operation, params
        if known_path:
            raise ArmError(
                405,
                "MethodNotAllowed",
                f"The requested method '{request.method}' is not allowed on '{path}'.",
            )
        raise ArmError(
            404,
            "InvalidResourceType",
            f"The resource type could not be found for the path '{path}' in the namespace "
            "'Microsoft.Compute'. armsim serves scale sets, their VMs, Flexible VMs, usages "
            "and operation status.",
        )

    def _authenticate(self, request: Request) -> dict[str, str]:
        header = request.headers.get("authorization", "")
        if not header:
            raise ArmError(
                401,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ArmError(
                401,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is provided in an invalid "
                "format.",
            )
        claims = claims_from_token(token.strip())
        if claims is None:
            claims = {OBJECT_ID_CLAIM: self.sim.scenario.app_principal_id}
        claims.setdefault(OBJECT_ID_CLAIM, self.sim.scenario.app_principal_id)
        return claims

    @staticmethod
    def _check_api_version(request: Request) -> None:
        version = request.query.get("api-version")
        if not version:
            raise ArmError(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        if not _API_VERSION.match(version):
            raise ArmError(
                400,
                "InvalidApiVersionParameter",
                f"The api-version '{version}' is invalid. The supported versions are dates "
                "like '2024-07-01'.",
            )

    def _faults(self, request: Request, operation: str, principal: str | None) -> Reply | None:
        fired = self.sim.faults.match(REQUEST_KINDS, operation, request.path, principal)
        if fired is None:
            return None
        rule = fired.rule
        if rule.kind == "slow":
            time.sleep(rule.delay)
            return None
        if rule.kind == "reset":
            return Reply(0, reset=True)
        if rule.kind == "throttle":
            retry_after = 10 if rule.retry_after is None else rule.retry_after
            raise throttle_error_for_fault(retry_after, rule.code or "HighCostGet30Min")
        defaults: dict[str, tuple[int, str, str]] = {
            "error": (500, "InternalServerError", "An internal server error occurred."),
            "quota": (
                409,
                "OperationNotAllowed",
                "Operation could not be completed as it results in exceeding approved "
                "standardDSv5Family Cores quota.",
            ),
            "sku_not_available": (
                409,
                "SkuNotAvailable",
                "The requested VM size is currently not available in this location or zone. "
                "See https://aka.ms/azureskunotavailable for details.",
            ),
            "linked_authorization_failed": (
                403,
                "LinkedAuthorizationFailed",
                f"The client '{principal}' has permission to perform action "
                f"'{VMSS_TYPE}/write' on scope '{request.path}'; however, it does not have "
                "permission to perform action 'Microsoft.Network/virtualNetworks/subnets/"
                "join/action' on the linked scope(s).",
            ),
            "conflict": (
                409,
                "OperationNotAllowed",
                "Operation is not allowed because another operation is in progress on the "
                "resource. Retry later.",
            ),
            "not_found": (
                404,
                "ResourceNotFound",
                f"The Resource '{request.path}' was not found.",
            ),
        }
        status, code, message = defaults[rule.kind]
        headers = {} if rule.retry_after is None else {"Retry-After": str(rule.retry_after)}
        raise ArmError(
            rule.status or status, rule.code or code, rule.message or message, headers=headers
        )

    def _advance_for_poll(self, operation: str, params: Mapping[str, str]) -> None:
        step = self.world.timings.poll_advance
        if operation != "operation.status":
            return
        op = self.world.operations.get(params.get("op", ""))
        if op is None or op.done:
            return
        if step > 0 and self.sim.clock.virtual:
            self.sim.clock.advance(step)
        elif self.sim.poll_delay > 0:
            # A poller with polling_interval=0 would otherwise spin while time stands still.
            time.sleep(self.sim.poll_delay)

    def _caller(self, request: Request, claims: Mapping[str, str]) -> Caller:
        return Caller(
            principal_id=claims[OBJECT_ID_CLAIM],
            claims=dict(claims),
            method=request.method,
            url=request.url,
            client_request_id=request.headers.get("x-ms-client-request-id", ""),
            correlation_id=request.headers.get("x-ms-correlation-request-id")
            or self.world.new_id(),
            client_ip=request.client_ip,
        )

    # --- helpers ------------------------------------------------------------------------

    def _lro(self, request: Request, op: Operation, status: int, body: Any = None) -> Reply:
        version = request.query.get("api-version", "")
        base = (
            f"{request.base_url}/subscriptions/{self.world.subscription_id}/providers/"
            f"Microsoft.Compute/locations/{op.location}/operations/{op.id}"
        )
        scenario = self.sim.scenario
        headers: dict[str, str] = {}
        if scenario.lro_headers == "compute":
            headers["Azure-AsyncOperation"] = f"{base}?p={op.id}&api-version={version}"
        if scenario.lro_headers == "location" or status == 202:
            headers["Location"] = f"{base}?p={op.id}&monitor=true&api-version={version}"
        if scenario.lro_retry_after is not None:
            headers["Retry-After"] = str(scenario.lro_retry_after)
        return Reply(status, body, headers)

    def _page(self, request: Request, items: list[Any], render_item: Callable) -> Reply:
        size = self.sim.scenario.page_size
        try:
            start = int(request.query.get("$skiptoken", "0"))
        except ValueError as error:
            raise bad_request("The $skiptoken is not valid.", "InvalidParameter") from error
        chunk = items[start : start + size]
        body: dict[str, Any] = {"value": [render_item(item) for item in chunk]}
        if start + size < len(items):
            query = dict(request.query)
            query["$skiptoken"] = str(start + size)
            body["nextLink"] = f"{request.base_url}{request.path}?" + urllib.parse.urlencode(
                query, safe="/'$ ", quote_via=urllib.parse.quote
            )
        return Reply(200, body)

    @staticmethod
    def _json(request: Request) -> dict[str, Any]:
        if not request.body:
            raise bad_request(
                "The request content was invalid and could not be deserialized.",
                "InvalidRequestContent",
            )
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as error:
            raise bad_request(
                f"The request content was invalid and could not be deserialized: {error}",
                "InvalidRequestContent",
            ) from error
        if not isinstance(body, dict):
            raise bad_request("The request content must be a JSON object.", "InvalidRequestContent")
        return body

    @staticmethod
    def _expand(request: Request) -> bool:
        return request.query.get("$expand", "").lower() == "instanceview"

    # --- scale sets ---------------------------------------------------------------------

    def _vmss_list_all(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        return self._page(request, self.world.scale_sets_in(None), render.scale_set)

    def _vmss_list(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        return self._page(request, self.world.scale_sets_in(params["rg"]), render.scale_set)

    def _vmss_get(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        ss = self.world.find_scale_set(params["rg"], params["name"])
        return Reply(200, render.scale_set(ss), {"ETag": ss.etag})

    def _vmss_update(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        ss = self.world.find_scale_set(params["rg"], params["name"])
        body = self._json(request)
        op = self.world.update_scale_set(ss, body, caller, request.headers.get("if-match"))
        reply = self._lro(request, op, 200, render.scale_set(ss))
        reply.headers["ETag"] = ss.etag
        return reply

    def _vmss_create_or_update(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Reply:
        body = self._json(request)
        existing = self.world.scale_sets.get(f"{params['rg']}/{params['name']}".lower())
        if existing is not None and not existing.deleted:
            check_if_match(existing, request.headers.get("if-match"))
        op, created = self.world.create_scale_set(params["rg"], params["name"], body, caller)
        ss = self.world.find_scale_set(params["rg"], params["name"])
        reply = self._lro(request, op, 201 if created else 200, render.scale_set(ss))
        reply.headers["ETag"] = ss.etag
        return reply

    def _vmss_delete(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        ss = self.world.find_scale_set(params["rg"], params["name"])
        op = self.world.delete_scale_set(ss, caller)
        return self._lro(request, op, 202)

    def _vmss_delete_instances(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Reply:
        ss = self.world.find_scale_set(params["rg"], params["name"])
        body = self._json(request)
        ids = body.get("instanceIds")
        if not isinstance(ids, list):
            raise bad_request(
                "Required parameter 'instanceIds' is missing (null).",
                "InvalidParameter",
                "instanceIds",
            )
        op = self.world.delete_instances(ss, ids, caller)
        return self._lro(request, op, 202)

    def _vmss_get_instance_view(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Reply:
        ss = self.world.find_scale_set(params["rg"], params["name"])
        if ss.mode == "Flexible":
            raise _not_allowed_on_flexible("VirtualMachineScaleSets.instanceView.GET", ss.name)
        return Reply(200, render.scale_set_instance_view(ss, self.world.now))

    # --- scale set VMs ------------------------------------------------------------------

    def _vmss_vm_list(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        ss = self.world.find_scale_set(params["rg"], params["name"])
        vms = [vm for vm in ss.vms.values() if not vm.gone]
        if ss.mode == "Flexible":
            return self._page(request, vms, render.bare_scale_set_vm)
        expand = self._expand(request)
        now = self.world.now
        health = ss.mode in self.sim.scenario.vm_health_in_lists
        codes = ss.mode in self.sim.scenario.failure_codes_in_lists
        return self._page(
            request,
            vms,
            lambda vm: render.scale_set_vm(vm, now, expand, health=health, failure_code=codes),
        )

    def _vmss_vm_get(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        vm = self.world.find_scale_set_vm(params["rg"], params["name"], params["instance"])
        version = request.query.get("api-version", "")
        if vm.scale_set.mode == "Flexible" and version[:10] < FLEXIBLE_VMSS_VM_API:
            raise bad_request(
                f"Getting a VM of Flexible scale set {vm.scale_set.name} through the scale set "
                f"VM API needs api-version {FLEXIBLE_VMSS_VM_API} or later; got {version}.",
                "OperationNotAllowed",
            )
        return Reply(200, render.scale_set_vm(vm, self.world.now, self._expand(request)))

    def _vmss_vm_get_instance_view(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Reply:
        vm = self.world.find_scale_set_vm(params["rg"], params["name"], params["instance"])
        return Reply(200, render.instance_view(vm, self.world.now))

    def _vmss_vm_update(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        vm = self.world.find_scale_set_vm(params["rg"], params["name"], params["instance"])
        body = self._json(request)
        policy = (body.get("properties") or {}).get("protectionPolicy") or {}
        op = self.world.update_protection(vm, policy, caller)
        return self._lro(request, op, 200, render.scale_set_vm(vm, self.world.now, False))

    def _vmss_vm_delete(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        vm = self.world.find_scale_set_vm(params["rg"], params["name"], params["instance"])
        op = self.world.delete_vm(vm, caller, flexible_api=False)
        return self._lro(request, op, 202)

    def _vmss_vm_deallocate(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Reply:
        vm = self.world.find_scale_set_vm(params["rg"], params["name"], params["instance"])
        op = self.world.deallocate_vm(vm, caller, flexible_api=False)
        return self._lro(request, op, 202)

    # --- Flexible VMs -------------------------------------------------------------------

    def _vm_list(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        expand = self._expand(request)
        raw_filter = request.query.get("$filter")
        if raw_filter:
            match = _VM_FILTER.match(raw_filter)
            if match is None:
                raise bad_request(
                    f"The value of $filter '{raw_filter}' is not supported. Use "
                    "'virtualMachineScaleSet/id' eq '<scale set resource id>'.",
                    "InvalidParameter",
                    "$filter",
                )
            self.world.require_group(params["rg"])
            vms = self._vms_of_scale_set(match["id"], params["rg"])
        else:
            if request.query.get("$expand"):
                raise bad_request(
                    "The $expand=instanceView option is supported only together with $filter "
                    "on 'virtualMachineScaleSet/id'.",
                    "InvalidParameter",
                    "$expand",
                )
            vms = self.world.vms_in(params["rg"])
        now = self.world.now
        health = "Flexible" in self.sim.scenario.vm_health_in_lists
        codes = "Flexible" in self.sim.scenario.failure_codes_in_lists
        return self._page(
            request,
            vms,
            lambda vm: render.virtual_machine(vm, now, expand, health=health, failure_code=codes),
        )

    def _vms_of_scale_set(self, scale_set_id: str, group: str) -> list[Any]:
        parts = scale_set_id.strip("/").split("/")
        if len(parts) != 8 or parts[6].lower() != "virtualmachinescalesets":
            raise bad_request(
                f"'{scale_set_id}' is not a scale set resource id.", "InvalidParameter", "$filter"
            )
        if parts[3].lower() != group.lower():
            return []
        ss = self.world.scale_sets.get(f"{parts[3]}/{parts[7]}".lower())
        if ss is None or ss.deleted or ss.mode != "Flexible":
            return []
        return [vm for vm in ss.vms.values() if not vm.gone]

    def _vm_get(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        vm = self.world.find_vm(params["rg"], params["vm"])
        return Reply(200, render.virtual_machine(vm, self.world.now, self._expand(request)))

    def _vm_instance_view(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Reply:
        vm = self.world.find_vm(params["rg"], params["vm"])
        return Reply(200, render.instance_view(vm, self.world.now))

    def _vm_delete(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        vm = self.world.find_vm(params["rg"], params["vm"])
        op = self.world.delete_vm(vm, caller, flexible_api=True)
        return self._lro(request, op, 202)

    def _vm_deallocate(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        vm = self.world.find_vm(params["rg"], params["vm"])
        op = self.world.deallocate_vm(vm, caller, flexible_api=True)
        return self._lro(request, op, 202)

    # --- autoscale settings (Microsoft.Insights) ----------------------------------------

    def _vmss_rolling_upgrade_latest(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Reply:
        return Reply(200, self.sim.upgrades.latest(params["rg"], params["name"]))

    def _autoscale_list(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        return self._page(request, self.sim.autoscale.documents(), lambda doc: doc)

    def _autoscale_get(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        return Reply(200, self.sim.autoscale.get(params["rg"], params["setting"]))

    # --- usages and operations ----------------------------------------------------------

    def _usage_list(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        return Reply(200, render.usages(self.world.usages(params["loc"])))

    def _sku_list(self, request: Request, params: Mapping[str, str], caller: Caller) -> Reply:
        raw_filter = request.query.get("$filter")
        location = None
        if raw_filter:
            match = _LOCATION_FILTER.match(raw_filter)
            if match is None:
                raise bad_request(
                    f"The $filter '{raw_filter}' is not supported. Use location eq '<location>'.",
                    "InvalidParameter",
                    "$filter",
                )
            location = match["loc"]
        return Reply(200, render.resource_skus(self.world.sku_catalog(location)))

    def _operation_status(
        self, request: Request, params: Mapping[str, str], caller: Caller
    ) -> Reply:
        op = self.world.operations.get(params["op"])
        if op is None:
            raise entity_not_found()
        wait = self.sim.scenario.lro_retry_after
        pending = {} if op.done or wait is None else {"Retry-After": str(wait)}
        if request.query.get("monitor", "").lower() != "true":
            return Reply(200, render.operation_status(op), pending)
        if not op.done:
            return Reply(202, None, {"Location": request.url, **pending})
        if op.result == "vmss" and op.scale_set is not None and not op.scale_set.deleted:
            return Reply(200, render.scale_set(op.scale_set))
        return Reply(200, None)


FLEXIBLE_VMSS_VM_API = "2023-09-01"
"""Oldest api-version whose scale-set-VM GET takes a Flexible VM's name as instance id."""


def _not_allowed_on_flexible(operation: str, name: str) -> ArmError:
    return ArmError(
        400,
        "BadRequest",
        f"Operation '{operation}' is not allowed on Virtual Machine Scale Set {name}.",
    )


def _throttle_scope(path: str) -> str:
    """The resource a per-resource bucket is kept for: the scale set of the path, if any."""
    lowered = path.lower()
    marker = "/virtualmachinescalesets/"
    index = lowered.find(marker)
    if index < 0:
        return lowered
    end = lowered.find("/", index + len(marker))
    return lowered if end < 0 else lowered[:end]


def _logged_body(request: Request) -> Any:
    if request.method not in WRITE_METHODS or not request.body:
        return None
    try:
        return json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return None


def _view_json(view: Any) -> dict[str, Any]:
    return {
        "id": view.id,
        "mode": view.mode,
        "capacity": view.capacity,
        "provisioningState": view.provisioning_state,
        "zones": view.zone_counts(),
        "vms": [
            {
                "instanceId": vm.instance_id,
                "zone": vm.zone,
                "provisioningState": vm.provisioning_state,
                "powerState": vm.power_state,
                "health": vm.health,
                "protected": vm.protect_from_scale_in or vm.protect_from_scale_set_actions,
            }
            for vm in view.vms
        ],
    }
