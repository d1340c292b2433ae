"""The HTTP pipeline policy that spends the throttling budget and decides about retries.

It replaces azure-core's `RetryPolicy`, whose defaults (10 attempts, honouring any `Retry-After`,
sleeping on the wall clock) could sleep through a whole Functions invocation. Per attempt:

1. book a slot in the `Budget` for the request's kind; wait for it on the injected clock, or
   raise `BudgetExhausted` when the wait is longer than `max_wait` (nothing is sent);
2. send; feed `x-ms-ratelimit-remaining-resource` back into the budget;
3. on 429, hold the kind for `Retry-After`; on 408/429/5xx or a connection error, retry (at most
   `attempts` in all) unless the wait is longer than `max_wait`: then the error response goes
   back to the caller, which reports `throttled(retry_after)` or `transient`.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

from azure.core.exceptions import (
    ClientAuthenticationError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import HTTPPolicy

from rebalancer.budget import Budget, CallKind
from rebalancer.clock import Clock
from rebalancer.compute.errors import parse_retry_after

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset((408, 429, 500, 502, 503, 504))

_SCALE_SET = re.compile(
    r"^(?P<id>/subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft\.compute"
    r"/virtualmachinescalesets/[^/]+)(?P<rest>/.*)?$"
)
_SCALE_SET_LIST = re.compile(
    r"^/subscriptions/[^/]+(/resourcegroups/[^/]+)?/providers/microsoft\.compute"
    r"/virtualmachinescalesets/?$"
)
_VM_LIST = re.compile(
    r"^/subscriptions/[^/]+(/resourcegroups/[^/]+)?/providers/microsoft\.compute/virtualmachines/?$"
)
_USAGES = re.compile(r"/providers/microsoft\.compute/locations/[^/]+/usages/?$")
_SKUS = re.compile(r"/providers/microsoft\.compute/skus/?$")


def classify_request(method: str, url: str) -> tuple[CallKind, str | None]:
    """Which budget a request spends, and the scale set id for per-resource policies."""
    path = urlsplit(url).path.lower().rstrip("/")
    method = method.upper()
    scale_set = _SCALE_SET.match(path)
    if method == "GET":
        if _SCALE_SET_LIST.match(path):
            return CallKind.SCALE_SET_LIST, None
        if scale_set:
            rest = scale_set["rest"] or ""
            if rest == "":
                return CallKind.SCALE_SET_GET, scale_set["id"]
            if rest == "/virtualmachines":
                return CallKind.SCALE_SET_VM_LIST, scale_set["id"]
            return CallKind.OTHER_READ, scale_set["id"]
        if _VM_LIST.match(path):
            return CallKind.VM_LIST, None
        if _USAGES.search(path):
            return CallKind.USAGE_LIST, None
        if _SKUS.search(path):
            return CallKind.SKU_LIST, None
        if "/operations/" in path or "/operationresults/" in path:
            return CallKind.OPERATION_STATUS, None
        return CallKind.OTHER_READ, None
    if scale_set and method in ("PATCH", "PUT") and not scale_set["rest"]:
        return CallKind.SCALE_SET_UPDATE, scale_set["id"]
    if scale_set and method == "POST" and scale_set["rest"] == "/delete":
        return CallKind.SCALE_SET_DELETE_INSTANCES, scale_set["id"]
    if method == "DELETE":
        return CallKind.OTHER_DELETE, scale_set["id"] if scale_set else None
    return CallKind.OTHER_WRITE, scale_set["id"] if scale_set else None


class BudgetExhausted(Exception):
    """The budget would make this call wait longer than the caller can afford."""

    def __init__(self, kind: CallKind, wait: float) -> None:
        super().__init__(f"{kind} calls are over budget for the next {wait:.0f} s")
        self.kind = kind
        self.wait = wait


class GovernedRetryPolicy(HTTPPolicy):
    def __init__(
        self,
        budget: Budget,
        clock: Clock,
        *,
        max_wait: float,
        attempts: int = 4,
        backoff: float = 1.0,
        backoff_max: float = 20.0,
    ) -> None:
        super().__init__()
        self.budget = budget
        self.clock = clock
        self.max_wait = max_wait
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.backoff_max = backoff_max

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff * 2 ** (attempt - 1))

    def send(self, request: PipelineRequest) -> PipelineResponse:
        http_request = request.http_request
        kind, resource = classify_request(http_request.method, http_request.url)
        attempt = 0
        last_response: PipelineResponse | None = None
        last_error: Exception | None = None
        while True:
            attempt += 1
            booked_at = self.clock.monotonic()
            reservation = self.budget.reserve(
                kind, booked_at, resource=resource, max_wait=self.max_wait
            )
            if not reservation.granted:
                # A retry the budget cannot afford ends with what the last attempt got.
                if last_response is not None:
                    return last_response
                if last_error is not None:
                    raise last_error
                raise BudgetExhausted(kind, reservation.wait)
            if reservation.wait > 0:
                log.debug("budget: %s waits %.1f s", kind, reservation.wait)
                # Sleep until the booked slot; other threads may have moved the clock already.
                self.clock.sleep_until(booked_at + reservation.wait)
            try:
                response = self.next.send(request)
            except ClientAuthenticationError:
                raise
            except (ServiceRequestError, ServiceResponseError) as error:
                # Every call the adapter makes is safe to repeat (GETs, an absolute capacity,
                # deleting named instances), so a lost response is retried like a lost request.
                wait = self._backoff(attempt)
                if attempt >= self.attempts or wait > self.max_wait:
                    raise
                last_response, last_error = None, error
                self.clock.sleep(wait)
                continue
            headers = response.http_response.headers
            status = response.http_response.status_code
            if status != 429:  # a 429's Retry-After says exactly when; its remaining is 0
                self.budget.observe_headers(
                    kind, headers, self.clock.monotonic(), resource=resource
                )
            if status not in RETRY_STATUSES:
                return response
            retry_after = parse_retry_after(headers.get("Retry-After"))
            if status == 429:
                hold = retry_after if retry_after is not None else self._backoff(attempt)
                self.budget.hold(kind, self.clock.monotonic() + hold)
            wait = retry_after if retry_after is not None else self._backoff(attempt)
            if attempt >= self.attempts or wait > self.max_wait:
                return response
            last_response, last_error = response, None
            if status != 429:  # a 429's wait is the budget hold, taken at the next reserve
                self.clock.sleep(wait)
