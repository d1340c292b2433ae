"""What the reconciler concludes about a scale set, as plain values: the gates that hold a
planned move back, the verdict (assessment + gate) and the result of one reconcile pass.

Pure: the reconciler produces these, telemetry, notifications and the service read them;
none of them needs the others to name them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from rebalancer import autoscale
from rebalancer.evaluator import Assessment, Decision
from rebalancer.model import Instance, ScaleSetRef
from rebalancer.settings import OptIn


class Outcome(StrEnum):
    BUSY = "busy"
    """Another invocation holds the scale set's lock; it is doing the work."""
    ADVANCED = "advanced"
    STARTED = "started"
    ASSESSED = "assessed"
    GONE = "gone"
    DEFERRED = "deferred"
    """Azure or Table Storage could not answer now; the next trigger tries again."""
    STUCK = "stuck"
    """The in-flight operation's record cannot be read; nothing is done until a person looks."""


class Gate(StrEnum):
    """Why a move the evaluator planned does not start now (on top of the evaluator's reasons)."""

    MODE_AUDIT = "mode_audit"
    MODE_OFF = "mode_off"
    NOT_OPTED_IN = "not_opted_in"
    OPTED_OUT = "opted_out"
    AUTOSCALE_AT_MAXIMUM = autoscale.REASON
    """A skip, not a wait: autoscale would take back the VMs a move adds."""
    UPGRADE_IN_PROGRESS = "upgrade_in_progress"
    """Someone else's model change or a rolling upgrade runs; the platform's balance waits too."""
    COOLDOWN = "cooldown"
    MIN_INTERVAL = "min_interval"
    ZONE_BACKOFF = "zone_backoff"
    PLACEMENT_TIE = "placement_tie"
    FAILED_REPLACEMENT = "failed_replacement"
    QUOTA = "quota"
    NO_SLOT = "no_slot"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The assessment plus the reconciler's gates: what happens to the scale set now."""

    assessment: Assessment
    opt_in: OptIn
    gate: Gate | None = None
    gate_detail: str = ""
    instances: tuple[Instance, ...] = ()
    """The VMs assessed: stored with the assessment to see silent changes next time."""

    @property
    def decision(self) -> str:
        if self.gate is Gate.AUTOSCALE_AT_MAXIMUM:
            return str(Decision.SKIP)
        if self.gate is not None and self.assessment.decision is Decision.MOVE:
            return "wait"
        return str(self.assessment.decision)

    @property
    def reason(self) -> str:
        return str(self.gate) if self.gate is not None else str(self.assessment.reason)

    @property
    def detail(self) -> str:
        return self.gate_detail if self.gate is not None else self.assessment.detail

    def to_json(self) -> str:
        a = self.assessment
        return json.dumps(
            {
                "id": a.ref.id,
                "balanced": a.balanced,
                "zones": {z: {"total": c.total, "active": c.active} for z, c in a.zones.items()},
                "decision": self.decision,
                "reason": self.reason,
                "detail": self.detail,
                "mode": str(self.opt_in),
                "instances": sorted(instance.id for instance in self.instances),
                "moves": [
                    {"fromZone": m.from_zone, "toZone": m.to_zone, "source": m.source}
                    for m in a.moves
                ],
            },
            sort_keys=True,
        )


@dataclass(frozen=True, slots=True)
class Result:
    ref: ScaleSetRef
    outcome: Outcome
    state: str | None = None
    verdict: Verdict | None = None
    detail: str = ""
