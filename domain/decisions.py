"""Decision events: what Retrainer tells the outside world it decided, as CloudEvents 1.0.

Every decision (a run started or finished, a gate verdict, an approval asked for or answered, a
canary step judged, a rollout ended, the champion moved) writes one `DecisionEvent` into the outbox
in the decision's own transaction (storage/repositories/outbox.py). The relay (flows/relay.py)
publishes it to Kafka (`retrainer.decisions`, keyed by pipeline) and delivers it to the pipeline's
webhooks, at least once and always with the same `id`: a consumer deduplicates by id.

This module holds the type names, the small typed data of each type, the one JSON form an event
travels in (the CloudEvents JSON format: Kafka's and HTTP's structured mode alike) and the webhook
signature (`Retrainer-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from domain.outcomes import Verdict

if TYPE_CHECKING:  # the spec imports this module's type names, and the entities import the spec
    from domain import entities as e


class DecisionType(StrEnum):
    RUN_CREATED = "dev.retrainer.run.created"
    RUN_STARTED = "dev.retrainer.run.started"
    RUN_FINISHED = "dev.retrainer.run.finished"
    GATE_DECIDED = "dev.retrainer.gate.decided"
    APPROVAL_REQUESTED = "dev.retrainer.approval.requested"
    APPROVAL_DECIDED = "dev.retrainer.approval.decided"
    ROLLOUT_STEP_DECIDED = "dev.retrainer.rollout.step_decided"
    ROLLOUT_FINISHED = "dev.retrainer.rollout.finished"
    MODEL_PROMOTED = "dev.retrainer.model.promoted"
    CHAMPION_ROLLED_BACK = "dev.retrainer.champion.rolled_back"


SOURCE = "//retrainer/decisions"
CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
SIGNATURE_HEADER = "Retrainer-Signature"
SIGNATURE_TOLERANCE_S = 300
"""A receiver refuses a signature older than this: a captured delivery cannot be replayed later."""


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    """One decision as a CloudEvent: `pipeline` is its subject and its Kafka record key."""

    id: str
    type: DecisionType
    pipeline: str
    time: datetime
    data: dict[str, Any]
    source: str = SOURCE

    def structured(self) -> dict[str, Any]:
        """The CloudEvents JSON format of the event (what `body` encodes)."""
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type.value,
            "subject": self.pipeline,
            "time": self.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": self.data,
        }

    def body(self) -> bytes:
        """The bytes sent to Kafka and to webhooks, and signed: compact JSON, keys in a fixed order."""
        return json.dumps(self.structured(), separators=(",", ":"), sort_keys=True).encode()


def decision_event(
    kind: DecisionType, pipeline: str, data: dict[str, Any], *, now: datetime | None = None
) -> DecisionEvent:
    """A new event of `kind` with a fresh id (kept for ever: every redelivery carries it)."""
    return DecisionEvent(str(uuid.uuid4()), kind, pipeline, now or datetime.now(UTC), data)


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One event to one webhook, and how its delivery went (`error`: why the last try failed)."""

    id: int
    event: DecisionEvent
    url: str
    secret_env: str
    status: DeliveryStatus
    attempts: int
    response_status: int | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


# ------------------------------------------------------------------------------ the data of each type


def _outcome(run: e.Run) -> dict[str, Any]:
    """The run's stored outcome; {} when absent or not a mapping (evidence written by older versions)."""
    outcome = (run.evidence or {}).get("outcome")
    return outcome if isinstance(outcome, dict) else {}


def _approval(run: e.Run) -> dict[str, Any]:
    approval = _outcome(run).get("approval")
    return approval if isinstance(approval, dict) else {}


def run_event(kind: DecisionType, run: e.Run) -> DecisionEvent:
    """run.created / run.started / run.finished: the run's state as of the decision."""
    outcome = _outcome(run)
    data: dict[str, Any] = {"run_id": run.id, "status": run.status.value, "trigger": run.trigger_kind.value}
    if kind is DecisionType.RUN_FINISHED:
        data["reason"] = outcome.get("reason") or run.error or run.reason
        data["model_version_id"] = run.model_version_id
    return decision_event(kind, run.pipeline, data)


def run_transition_events(before: e.RunStatus | None, run: e.Run) -> list[DecisionEvent]:
    """The events of a run's move from `before` (None: just created) to its stored status."""
    if before is None:
        return [run_event(DecisionType.RUN_CREATED, run)]
    if run.status is before:
        return []
    events = []
    if before.value == "awaiting_approval":
        events.append(approval_decided_event(run))
    if run.status.value == "running":
        events.append(run_event(DecisionType.RUN_STARTED, run))
    elif run.status.value == "awaiting_approval":
        events.append(approval_requested_event(run))
    if run.status.is_final:
        events.append(run_event(DecisionType.RUN_FINISHED, run))
    return events


def gate_event(
    pipeline: str, run_id: str, checks: Sequence[e.GateCheck], model_version_id: int | None
) -> DecisionEvent:
    """gate.decided: the overall verdict and each failed check (the rest is in the decision record)."""
    overall = next((c for c in checks if c.metric == "overall"), None)
    failed = [c for c in checks if c.verdict is Verdict.FAIL and c.metric != "overall"]
    data = {
        "run_id": run_id,
        "model_version_id": model_version_id,
        "passed": overall is not None and overall.verdict is Verdict.PASS,
        "reason": overall.reason if overall else None,
        "failed_checks": [{"metric": c.metric, "check": c.check, "reason": c.reason} for c in failed],
    }
    return decision_event(DecisionType.GATE_DECIDED, pipeline, data)


def approval_requested_event(run: e.Run) -> DecisionEvent:
    request = _approval(run)
    data = {"run_id": run.id, "model_version_id": run.model_version_id, "deadline": request.get("deadline")}
    return decision_event(DecisionType.APPROVAL_REQUESTED, run.pipeline, data)


def approval_decided_event(run: e.Run) -> DecisionEvent:
    """approval.decided: approved, rejected, expired (the timeout) or superseded, by whom and why."""
    decided = _approval(run)
    data = {
        "run_id": run.id,
        "decision": decided.get("decision"),
        "actor": decided.get("actor"),
        "reason": decided.get("reason"),
        "status": run.status.value,
    }
    return decision_event(DecisionType.APPROVAL_DECIDED, run.pipeline, data)


def rollout_step_event(rollout: e.Rollout, step: e.RolloutStep) -> DecisionEvent:
    data = {
        "rollout_id": rollout.id,
        "run_id": rollout.run_id,
        "step_index": step.step_index,
        "traffic_percent": step.traffic_percent,
        "verdict": step.verdict.value if step.verdict else None,
        "reason": step.analysis.reason,
    }
    return decision_event(DecisionType.ROLLOUT_STEP_DECIDED, rollout.pipeline, data)


def rollout_finished_event(rollout: e.Rollout) -> DecisionEvent:
    """rollout.finished: promoted, rolled_back, aborted or failed, with the reason."""
    data = {
        "rollout_id": rollout.id,
        "run_id": rollout.run_id,
        "status": rollout.status.value,
        "reason": rollout.reason,
        "candidate_version_id": rollout.candidate_version_id,
        "champion_version_id": rollout.champion_version_id,
    }
    return decision_event(DecisionType.ROLLOUT_FINISHED, rollout.pipeline, data)


def champion_event(move: e.AliasMove, *, rolled_back: bool) -> DecisionEvent:
    """model.promoted, or champion.rolled_back when a person moved the champion back."""
    kind = DecisionType.CHAMPION_ROLLED_BACK if rolled_back else DecisionType.MODEL_PROMOTED
    data = {
        "from_version_id": move.from_version_id,
        "to_version_id": move.to_version_id,
        "run_id": move.run_id,
        "actor": move.actor,
        "reason": move.reason,
    }
    return decision_event(kind, move.pipeline, data, now=move.moved_at)


# ------------------------------------------------------------------------------ webhook signature


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The `Retrainer-Signature` header's value for `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def signature_matches(
    secret: str, body: bytes, header: str, *, now: float, tolerance_s: float = SIGNATURE_TOLERANCE_S
) -> bool:
    """What a receiver checks: the header is well formed, recent (no replay) and signs this body."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, body, timestamp), f"t={timestamp},v1={parts.get('v1', '')}")
