"""Event Grid subscription events for the writes, deletes and actions armsim completes.

Each finished long-running operation (and each write rejected after authorization) produces
the event ARM would publish to the subscription's system topic, in the Event Grid schema:
`Microsoft.Resources.Resource{Write,Delete,Action}{Success,Failure,Cancel}` with `data`
carrying `authorization`, `claims` (the caller's object id), `correlationId`, `httpRequest`,
`operationName`, `resourceUri` and `status`. Events go out when the operation ends, not when
it is accepted.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from armsim.clock import iso
from armsim.resources import Caller

OBJECT_ID_CLAIM = "http://schemas.microsoft.com/identity/claims/objectidentifier"
TENANT_ID_CLAIM = "http://schemas.microsoft.com/identity/claims/tenantid"
_KIND = {"write": "Write", "delete": "Delete", "action": "Action"}
_OUTCOME = {"Succeeded": "Success", "Failed": "Failure", "Canceled": "Cancel"}
_GROUPS = re.compile(r"/resourceGroups/", re.IGNORECASE)

log = logging.getLogger(__name__)

EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What an event needs to know about the operation it reports."""

    kind: str
    status: str
    operation_name: str
    resource_id: str
    caller: Caller
    at: datetime


def subject_for(resource_id: str) -> str:
    """ARM reports scale set resources with `resourcegroups` in lower case, VMs as given."""
    if "/providers/Microsoft.Compute/virtualMachineScaleSets/" in resource_id:
        return _GROUPS.sub("/resourcegroups/", resource_id, count=1)
    return resource_id


def build_event(
    facts: EventFacts, subscription_id: str, tenant_id: str, event_id: str
) -> dict[str, Any]:
    subject = subject_for(facts.resource_id)
    caller = facts.caller
    principal = caller.principal_id
    event_type = f"Microsoft.Resources.Resource{_KIND[facts.kind]}{_OUTCOME[facts.status]}"
    claims = dict(caller.claims)
    claims.setdefault(OBJECT_ID_CLAIM, principal)
    claims.setdefault(TENANT_ID_CLAIM, tenant_id)
    return {
        "subject": subject,
        "eventType": event_type,
        "id": event_id,
        "data": {
            "authorization": {
                "scope": subject,
                "action": facts.operation_name,
                "evidence": {
                    "role": "Contributor",
                    "roleAssignmentScope": f"/subscriptions/{subscription_id}",
                    "roleAssignmentId": event_id.replace("-", ""),
                    "roleDefinitionId": "b24988ac618042a0ab8820f7382dd24c",
                    "principalId": principal,
                    "principalType": "ServicePrincipal" if claims.get("idtyp") == "app" else "User",
                },
            },
            "claims": claims,
            "correlationId": caller.correlation_id,
            "resourceProvider": "Microsoft.Compute",
            "resourceUri": subject,
            "operationName": facts.operation_name,
            "status": facts.status,
            "subscriptionId": subscription_id,
            "tenantId": tenant_id,
            "httpRequest": {
                "clientRequestId": caller.client_request_id,
                "clientIpAddress": caller.client_ip,
                "method": caller.method,
                "url": caller.url,
            },
        },
        "dataVersion": "2",
        "metadataVersion": "1",
        "eventTime": iso(facts.at),
        "topic": f"/subscriptions/{subscription_id}",
    }


@dataclass
class HttpEventDelivery:
    """Posts each event, as Event Grid does (a JSON array of one event), to `url`.

    Runs on its own thread so a slow receiver never holds up the simulator. Delivery is
    attempted `attempts` times; 200-204 is success; 400 and 413 are not retried.
    """

    url: str
    timeout: float = 5.0
    attempts: int = 3
    headers: Mapping[str, str] = field(default_factory=dict)
    delivered: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    _queue: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="armsim-event-delivery", daemon=True
            )
            self._thread.start()
        self._queue.put(event)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued event has been tried."""
        done = threading.Event()
        self._queue.put({"__flush__": done})  # type: ignore[dict-item]
        done.wait(timeout)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(self.timeout * self.attempts + 1)
            self._thread = None

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            if "__flush__" in event:
                event["__flush__"].set()
                continue
            self._deliver(event)

    def _deliver(self, event: dict[str, Any]) -> None:
        payload = json.dumps([event]).encode("utf-8")
        last = ""
        for _ in range(self.attempts):
            request = urllib.request.Request(
                self.url,
                data=payload,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "aeg-event-type": "Notification",
                    **self.headers,
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    if 200 <= response.status <= 204:
                        self.delivered.append(event["id"])
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code}"
                if error.code in (400, 413):
                    break
            except OSError as error:
                last = str(error)
        log.warning("event %s not delivered to %s: %s", event["id"], self.url, last)
        self.failed.append((event["id"], last))
