"""The decision record of one run, assembled from repository reads.

The chain a reviewer follows: trigger and events → dataset version → candidate metrics →
champion metrics on the same data → gate verdicts → quantization → outcome and alias moves.
`retrainer runs show` prints it, the API serves it at GET /api/v1/runs/{id} and the demo's
report shows it. Storage returns entities; the JSON-safe shape is decided here, above storage,
so a new reader of the record never needs a new repository function.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy.orm import Session

from storage import repositories as repo

# Evidence keys stored on the run (flows/pipeline.py writes them), copied into `decision` as is.
_EVIDENCE_BEFORE_GATE = (
    "data_split",
    "training",
    "candidate",
    "champion",
    "comparisons",
    "disagreement",
    "quantization",
)

# Which attributes of each entity the record shows, in order; `key=attribute` renames one.
_EVENT = "id=event_id source type topic partition offset received_at"
_DATASET = "dataset version uri rows sha256"
_GATE_VERDICT = "metric check verdict candidate=candidate_value champion=champion_value threshold ci_low ci_high reason"
_ALIAS_MOVE = "from_version_id to_version_id actor reason moved_at"


def decision_record(session: Session, run_id: str) -> dict[str, Any]:
    """The whole chain for one run, JSON-safe. Raises NotFoundError for an unknown run."""
    run = repo.get_run(session, run_id)
    evidence = run.evidence or {}
    version = repo.get_model_version_by_id(session, run.model_version_id) if run.model_version_id else None
    dataset = repo.get_dataset_version(session, run.dataset_version_id) if run.dataset_version_id else None
    decision: dict[str, Any] = {"dataset": None if dataset is None else _pick(dataset, _DATASET)}
    decision.update({key: evidence.get(key) for key in _EVIDENCE_BEFORE_GATE})
    if "tuning" in evidence:  # only a spec with a tuning section searches (flows/tuning.py)
        decision["tuning"] = evidence["tuning"]
    decision["gate"] = [_pick(verdict, _GATE_VERDICT) for verdict in repo.gate_verdicts(session, run_id)]
    decision["outcome"] = evidence.get("outcome")
    decision["alias_moves"] = [_pick(move, _ALIAS_MOVE) for move in repo.alias_moves_of_run(session, run_id)]
    return {
        "run_id": run.id,
        "pipeline": run.pipeline,
        "status": run.status.value,
        "trigger": {
            "kind": run.trigger_kind.value,
            "event_ids": list(run.event_ids),
            "reason": run.reason,
            "events": [_pick(event, _EVENT) for event in repo.run_events(session, run_id)],
        },
        "model_version": version.version if version else None,
        "decision": decision,
        "error": run.error,
        "prefect_flow_run_id": run.prefect_flow_run_id,
        "created_at": run.created_at.isoformat(),
        "started_at": _isoformat(run.started_at),
        "finished_at": _isoformat(run.finished_at),
    }


def _isoformat(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _pick(entity: object, fields: str) -> dict[str, Any]:
    """The entity's named attributes, JSON-safe (enums by value, datetimes in ISO 8601)."""
    picked: dict[str, Any] = {}
    for field in fields.split():
        key, _, attribute = field.partition("=")
        value = getattr(entity, attribute or key)
        if isinstance(value, Enum):
            value = value.value
        picked[key] = _isoformat(value) if isinstance(value, datetime) else value
    return picked
