"""Reading the subscription's autoscale settings: one paged ARM list through the Compute client.

No azure-mgmt-monitor client: the list is a plain GET sent with the Compute client's pipeline
(`send_request`), so it spends the same throttling budget, takes the same token and keeps the
cold start light.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from rebalancer.autoscale import AutoscaleParseError, AutoscaleSetting, parse_settings
from rebalancer.compute.errors import AdapterError, ErrorKind, from_response

API_VERSION = "2022-10-01"


def list_autoscale_settings(
    client: Any, endpoint: str, subscription_id: str
) -> tuple[AutoscaleSetting, ...]:
    """Every autoscale setting of the subscription (`AutoscaleSettings_ListBySubscription`)."""
    from azure.core.rest import HttpRequest

    base = endpoint.rstrip("/")
    url: str | None = (
        f"{base}/subscriptions/{subscription_id}/providers/Microsoft.Insights/"
        f"autoscalesettings?api-version={API_VERSION}"
    )
    expected = urlsplit(base)
    documents: list[Any] = []
    while url:
        actual = urlsplit(url)
        if (actual.scheme, actual.netloc.lower()) != (expected.scheme, expected.netloc.lower()):
            raise AdapterError(
                ErrorKind.INVALID,
                f"autoscale settings nextLink {url!r} is not on the configured endpoint "
                f"{endpoint!r}; refusing to send a token there",
            )
        response = client.send_request(HttpRequest("GET", url))
        body = response.read()
        if response.status_code >= 400:
            raise from_response(response.status_code, response.headers, body)
        page = response.json() if body else {}
        documents.extend(page.get("value") or ())
        url = page.get("nextLink") or None
    try:
        return parse_settings(documents)
    except AutoscaleParseError as error:
        raise AdapterError(
            ErrorKind.INVALID, f"unreadable autoscale setting from Azure Monitor: {error}"
        ) from None
