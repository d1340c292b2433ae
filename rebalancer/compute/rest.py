"""ARM reads as JSON through azure-core's pipeline, without the Compute SDK's models.

Every read the adapter makes (scale sets, VM lists with instance views, single VMs, rolling
upgrades, quota, operation status, autoscale settings) goes through `ArmReader`: the
policies azure-mgmt-compute's client runs (request id, user agent, proxy, redirects, the
`GovernedRetryPolicy` that spends the budget, the bearer token, logging and tracing), over the
adapter's transport, with the api-versions the SDK sends. Only what it answers differs: the
JSON ARM sent, which `rebalancer.arm` parses straight into the core's values. Deserialising a
page into the SDK's models and `as_dict()` back cost most of an audit's CPU, and importing the
SDK (every model of the Compute API) most of a cold start's first tick; the SDK's client is
built on the first write only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from rebalancer import __version__
from rebalancer.compute.errors import AdapterError, ErrorKind, from_response

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.core.pipeline.policies import HTTPPolicy

COMPUTE_API_VERSION = "2026-04-01"
"""What azure-mgmt-compute 39 sends for scale sets, their VMs, VMs and usages."""
SKU_API_VERSION = "2021-07-01"
"""What azure-mgmt-compute 39 sends for resource SKUs."""

RATE_LIMIT_HEADERS = frozenset(
    (
        "x-ms-ratelimit-remaining-subscription-reads",
        "x-ms-ratelimit-remaining-subscription-writes",
        "x-ms-ratelimit-remaining-resource",
        "x-ms-request-charge",
    )
)
"""Headers worth logging besides azure-core's safe list (azure-mgmt-core's ARM logging adds
the same)."""


def segment(value: str) -> str:
    """A resource group, name or instance id as one URL path segment."""
    return quote(value, safe="")


@dataclass(frozen=True, slots=True)
class Answer:
    """One read's answer: status, headers (case-insensitive) and body as ARM sent them."""

    status: int
    headers: Any
    body: bytes

    def json(self, what: str) -> Any:
        """The parsed body (None when empty); `what` names the read in the error."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError as error:
            raise AdapterError(
                ErrorKind.INVALID,
                f"unreadable JSON in the answer to {what}: {error}",
                status=self.status,
                request_id=_first(self.headers, "x-ms-request-id"),
            ) from None

    def error(self) -> AdapterError:
        return from_response(self.status, self.headers, self.body)


class ArmReader:
    """GETs against one ARM endpoint; thread-safe (the audit reads from several threads)."""

    def __init__(
        self,
        endpoint: str,
        credential: TokenCredential,
        scopes: tuple[str, ...],
        retry_policy: HTTPPolicy,
        transport: Any,
    ) -> None:
        from azure.core.pipeline import Pipeline, policies

        class _ArmLogging(policies.HttpLoggingPolicy):
            DEFAULT_HEADERS_ALLOWLIST = (
                policies.HttpLoggingPolicy.DEFAULT_HEADERS_ALLOWLIST | RATE_LIMIT_HEADERS
            )

        self.endpoint = endpoint.rstrip("/")
        self._origin = _origin(self.endpoint)
        self._pipeline = Pipeline(
            transport,
            policies=[
                policies.RequestIdPolicy(),
                policies.HeadersPolicy(),
                policies.UserAgentPolicy(sdk_moniker=f"vmss-zone-rebalancer/{__version__}"),
                policies.ProxyPolicy(),
                policies.RedirectPolicy(),
                retry_policy,
                policies.BearerTokenCredentialPolicy(credential, *scopes),
                policies.CustomHookPolicy(),
                policies.NetworkTraceLoggingPolicy(),
                policies.DistributedTracingPolicy(),
                policies.SensitiveHeaderCleanupPolicy(),
                _ArmLogging(),
            ],
        )

    def get(self, url: str, params: Mapping[str, str] | None = None) -> Answer:
        """One GET of `url` (a path on the endpoint, or a full URL on it: a `nextLink`, an
        operation's status). A URL on another host is refused: the token would go there."""
        from azure.core.rest import HttpRequest

        if url.startswith("/"):
            url = self.endpoint + url
        elif _origin(url) != self._origin:
            raise AdapterError(
                ErrorKind.INVALID,
                f"{url!r} is not on the configured endpoint {self.endpoint!r}; refusing to "
                "send a token there",
            )
        # azure-core sends query values as given; quote them as the SDK's serializer does.
        query = {name: quote(str(value), safe="") for name, value in (params or {}).items()}
        request = HttpRequest("GET", url, params=query)
        request.headers["Accept"] = "application/json"
        response = self._pipeline.run(request).http_response
        return Answer(response.status_code, response.headers, response.read())

    def document(self, url: str, params: Mapping[str, str] | None = None, *, what: str) -> Any:
        """The JSON of a GET that must succeed; an error answer raises its `AdapterError`."""
        answer = self.get(url, params)
        if answer.status >= 400:
            raise answer.error()
        return answer.json(what)

    def pages(
        self, url: str, params: Mapping[str, str] | None = None, *, what: str
    ) -> Iterator[list[Any]]:
        """The `value` of each page of a list, following `nextLink` (on the endpoint only)."""
        next_url: str | None = url
        while next_url:
            page = self.document(next_url, params, what=what)
            if not isinstance(page, Mapping) or not isinstance(page.get("value", []), list):
                raise AdapterError(
                    ErrorKind.INVALID,
                    f"the answer to {what} is not a list page ({{'value': [...]}})",
                )
            yield page.get("value") or []
            next_url, params = page.get("nextLink") or None, None

    def close(self) -> None:
        self._pipeline.__exit__()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _first(headers: Any, name: str) -> str | None:
    value = headers.get(name) if headers is not None else None
    return str(value) if value else None
