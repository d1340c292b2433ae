"""Reading the subscription's autoscale settings: one paged ARM list, read as JSON.

No azure-mgmt-monitor client: the list is a plain GET through the adapter's `ArmReader`, so it
spends the same throttling budget, takes the same token and keeps the cold start light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rebalancer.autoscale import AutoscaleParseError, AutoscaleSetting, parse_settings
from rebalancer.compute.errors import AdapterError, ErrorKind
from rebalancer.compute.rest import segment

if TYPE_CHECKING:
    from rebalancer.compute.rest import ArmReader

API_VERSION = "2022-10-01"


def list_autoscale_settings(
    reader: ArmReader, subscription_id: str
) -> tuple[AutoscaleSetting, ...]:
    """Every autoscale setting of the subscription (`AutoscaleSettings_ListBySubscription`);
    `nextLink` is followed on the configured endpoint only."""
    pages = reader.pages(
        f"/subscriptions/{segment(subscription_id)}/providers/Microsoft.Insights/autoscalesettings",
        {"api-version": API_VERSION},
        what="the subscription's autoscale settings list",
    )
    documents = [document for page in pages for document in page]
    try:
        return parse_settings(documents)
    except AutoscaleParseError as error:
        raise AdapterError(
            ErrorKind.INVALID, f"unreadable autoscale setting from Azure Monitor: {error}"
        ) from None
