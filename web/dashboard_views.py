"""What the dashboard's pages show beyond the report's views (`web/views.py`), as plain frozen data.

`api/report_data.py` collects these from SQL; `web/dashboard.py` renders them with the templates in
`web/templates/dashboard/`, which include the report's own run and rollout cards. `live_rollout`
shapes the JSON the live rollout page polls (`web/static/live.js`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from domain.entities import ModelVersion
from domain.evidence import VariantWindow
from web.views import AliasMoveReport, RolloutReport, RunReport


@dataclass(frozen=True, slots=True)
class RunRow:
    """One line of a run list: enough to find the run, not its whole record."""

    run_id: str
    status: str
    trigger_kind: str
    reason: str | None
    candidate_version: int | None
    created_at: datetime
    finished_at: datetime | None

    @property
    def short_id(self) -> str:
        return self.run_id[:8]


@dataclass(frozen=True, slots=True)
class PipelineCard:
    name: str
    dataset: str
    champion_version: int | None
    frozen_until: datetime | None  # None, or a time in the past: not frozen
    frozen: bool
    cooldown_seconds: float
    cooling_down_until: datetime | None  # the last promotion + cooldown, while still ahead
    schedule: str | None  # "cron (timezone)"
    next_run: datetime | None
    runs: tuple[RunRow, ...]  # newest first
    rollout: RolloutReport | None  # the active one, if any


@dataclass(frozen=True, slots=True)
class EventRow:
    event_id: str
    source: str
    type: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class EpochPoint:
    epoch: int
    train_loss: float | None
    val_loss: float | None
    val_metric: float | None


@dataclass(frozen=True, slots=True)
class RunPage:
    """A run's whole decision record, in the order a person reads it."""

    pipeline: str
    run: RunReport
    events: tuple[EventRow, ...]
    dataset_sha256: str | None
    dataset_rows: int | None
    val_metric: str  # the validation metric of `training` (accuracy, rmse)
    training: tuple[EpochPoint, ...]
    rollout: RolloutReport | None
    alias_moves: tuple[AliasMoveReport, ...]
    prefect_flow_run_id: str | None


@dataclass(frozen=True, slots=True)
class ModelsPage:
    """A pipeline's versions, each with its headline metric (None: not recorded), newest first, and
    the champion's alias history, newest first."""

    versions: tuple[tuple[ModelVersion, float | None], ...]
    alias_moves: tuple[AliasMoveReport, ...]
    pipeline: str
    headline_metric: str
    champion_version: int | None
    shown: int = 50  # at most this many versions and alias moves, the newest


def _window(w: VariantWindow) -> dict[str, Any]:
    return {
        "version": w.version,
        "requests": w.requests,
        "error_rate": w.error_rate,
        "latency_p50_ms": w.latency_p50_ms,
        "latency_p99_ms": w.latency_p99_ms,
        "labelled": w.labelled,
        "accuracy": w.correct / w.labelled if w.labelled else None,
    }


def live_rollout(pipeline: str, rollout: RolloutReport | None) -> dict[str, Any]:
    """The live page's JSON: the rollout's split and, per analysed window, both variants' numbers."""
    if rollout is None:
        return {"pipeline": pipeline, "rollout": None}
    current = rollout.steps[-1] if rollout.steps else None
    return {
        "pipeline": pipeline,
        "rollout": {
            "id": rollout.id,
            "status": rollout.status,
            "reason": rollout.reason,
            "candidate_version": rollout.candidate_version,
            "champion_version": rollout.champion_version,
            "step": current.step_index if current else None,
            "traffic_percent": current.traffic_percent if current else 0.0,
            "windows": [
                {
                    "step": step.step_index,
                    "window": number,
                    "at": attempt.at.isoformat(),
                    "action": str(attempt.action),
                    "traffic_percent": attempt.traffic_percent,
                    "psi": attempt.psi,
                    "canary": _window(attempt.canary),
                    "champion": _window(attempt.champion),
                }
                for step, number, attempt in rollout.windows
            ],
        },
    }


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """One record of the dead-letter topic: where it came from and why the consumer refused it."""

    partition: int
    offset: int
    timestamp: datetime | None
    key: str | None
    error: str  # the `retrainer-error` header: "reason: message"
    original: str | None  # "topic[partition]@offset" of the refused event
    value_preview: str  # the first bytes of the value, as text
    value_bytes: int


@dataclass(frozen=True, slots=True)
class DeadLetters:
    """What the dead-letter page shows: the topic's newest records, or why none could be read."""

    topic: str
    bootstrap_servers: str
    per_partition: int
    records: tuple[DeadLetterRow, ...] = ()  # newest first
    problem: str | None = None  # Kafka unreachable, the topic missing: said on the page, never a 500
