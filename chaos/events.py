"""Event Grid as the app meets it: at-least-once, late, out of order, and sometimes hostile.

`Delivery` holds the events armsim emitted for a scenario and hands them out the way Event Grid
may: delayed by a few steps, shuffled, some twice. An event whose invocation failed (transient
error, process death before the acknowledgement) comes back later, as Event Grid retries.
`hostile_events` makes payloads no honest system topic sends: wrong types, huge or garbled
ids, other subscriptions, scopes outside the app's, CloudEvents, forged callers.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from typing import Any

from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.meta import Datum

WRITE = "Microsoft.Compute/virtualMachineScaleSets/write"


def decode(payload: Any) -> Any:
    """What the Functions host hands the function; raises when the host could not decode it."""
    return EventGridEventInConverter.decode(Datum(json.dumps(payload), "json"), trigger_metadata={})


@dataclass
class Pending:
    payload: dict[str, Any]
    due: int
    """The first step at which Event Grid delivers it."""
    attempts: int = 0


@dataclass
class Delivery:
    rng: random.Random
    delay_probability: float = 0.3
    duplicate_probability: float = 0.2
    pending: list[Pending] = field(default_factory=list)
    delivered: int = 0
    duplicates: int = 0
    redelivered: int = 0

    def arrive(self, payload: dict[str, Any], step: int) -> None:
        delay = self.rng.randint(1, 3) if self.rng.random() < self.delay_probability else 0
        self.pending.append(Pending(payload, step + delay))

    def due(self, step: int, *, everything: bool = False) -> list[dict[str, Any]]:
        """The events delivered at this step: shuffled, some of them twice."""
        ready = [p for p in self.pending if everything or p.due <= step]
        self.pending = [p for p in self.pending if p not in ready]
        if not everything:
            self.rng.shuffle(ready)
        out: list[dict[str, Any]] = []
        for item in ready:
            out.append(item.payload)
            if not everything and self.rng.random() < self.duplicate_probability:
                out.append(item.payload)
                self.duplicates += 1
        self.delivered += len(out)
        return out

    def retry(self, payload: dict[str, Any], step: int) -> None:
        """The invocation failed or died before acknowledging: Event Grid delivers again."""
        self.redelivered += 1
        self.pending.append(Pending(payload, step + self.rng.randint(1, 2)))


def hostile_events(
    rng: random.Random,
    subscription_id: str,
    in_scope: str,
    outside: str,
    app_principal: str,
    real: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One to three payloads no honest system topic sends. `in_scope`/`outside` are scale set
    ids; `real` are events seen so far (to forge look-alikes)."""
    template: dict[str, Any] = {
        "id": f"hostile-{rng.getrandbits(48):012x}",
        "topic": f"/subscriptions/{subscription_id}",
        "subject": in_scope,
        "eventType": "Microsoft.Resources.ResourceWriteSuccess",
        "eventTime": "2026-11-20T09:14:03.5521987Z",
        "dataVersion": "2",
        "metadataVersion": "1",
        "data": {"operationName": WRITE, "resourceUri": in_scope, "claims": {}},
    }

    def variant(kind: str) -> dict[str, Any]:
        event = copy.deepcopy(template)
        data = event["data"]
        if kind == "outside_scope":
            event["subject"] = data["resourceUri"] = outside
        elif kind == "other_subscription":
            other = in_scope.replace(subscription_id, "ffffffff-0000-4000-8000-00000000dead")
            event["subject"] = data["resourceUri"] = other
        elif kind == "huge_id":
            event["id"] = "x" * rng.choice([2049, 5000, 70_000])
        elif kind == "huge_subject":
            data["resourceUri"] = in_scope + "/" + "a" * 4000
        elif kind == "garbled_subject":
            data["resourceUri"] = rng.choice(
                [
                    "/subscriptions/../../etc/passwd",
                    in_scope.replace("virtualMachineScaleSets", "virtualMachineScaleSets/../x"),
                    "\u202e" + in_scope,
                    in_scope + "\x00",
                    "",
                    "/subscriptions/" + subscription_id + "/resourcegroups//providers",
                ]
            )
        elif kind == "wrong_types":
            key = rng.choice(["id", "eventType", "subject", "data", "operationName", "claims"])
            value = rng.choice([None, 42, [1, 2], {"a": {"b": []}}, True, 1.5e308])
            if key in ("operationName", "claims"):
                data[key] = value
            else:
                event[key] = value
        elif kind == "bad_time":
            event["eventTime"] = rng.choice(["yesterday", "", "2026-13-45T99:99:99Z"])
        elif kind == "unknown_operation":
            data["operationName"] = rng.choice(
                ["Microsoft.Compute/virtualMachineScaleSets/WRITE/../delete", "x" * 300, ""]
            )
        elif kind == "forged_own_write":
            oid = "http://schemas.microsoft.com/identity/claims/objectidentifier"
            data["claims"] = {oid: app_principal}
        elif kind == "cloud_event":
            event = {
                "specversion": "1.0",
                "id": event["id"],
                "source": f"/subscriptions/{subscription_id}",
                "type": "Microsoft.Resources.ResourceWriteSuccess",
                "subject": in_scope,
                "time": "2026-11-20T09:14:03Z",
                "data": data,
            }
        elif kind == "replayed_id" and real:
            event["id"] = rng.choice(real)["id"]
            event["subject"] = data["resourceUri"] = outside
        elif kind == "no_data":
            event.pop("data")
        return event

    kinds = [
        "outside_scope",
        "other_subscription",
        "huge_id",
        "huge_subject",
        "garbled_subject",
        "wrong_types",
        "bad_time",
        "unknown_operation",
        "forged_own_write",
        "cloud_event",
        "replayed_id",
        "no_data",
    ]
    return [variant(rng.choice(kinds)) for _ in range(rng.randint(1, 3))]
