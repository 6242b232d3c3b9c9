"""The decision records of `web/views.py`, read from the metadata database: what the demo's HTML
report (`retrainer/report.py`) and the dashboard (`api/dashboard.py`) show.

`collect_report(session)` reads every pipeline; `collect_run(session, run_id)` one run with its
rollout, for a page that shows just that. Rows with a typed entity are read as such: a step's
canary analysis is a `domain.evidence.StepAnalysis` (older rows were migrated by revision 0003),
the gate is the run's `GateVerdict`s, the dataset and model versions their entities. Run evidence
(`runs.evidence`, written by `flows/pipeline.py`) is still free-form JSON, so its few keys are read
with the small helpers below: a missing or mistyped value shows as a dash.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.orm import Session

from domain import entities as e
from domain.errors import NotFoundError
from domain.task import Task
from storage import repositories as repo
from web.canary_checks import DASH
from web.views import (
    AliasMoveReport,
    GateRow,
    Interval,
    MetricPair,
    PipelineReport,
    Quantization,
    QuantizationVariant,
    ReportData,
    RolloutReport,
    RunReport,
    StepReport,
    compared_metrics,
    task_named,
)

MAX_RUNS = 1000  # list_runs' upper limit; a demo has a handful
MAX_ROLLOUTS = 1000

# ------------------------------------------------------------------------------ run evidence
# Needed only for `runs.evidence`, the one untyped JSON the report reads.


def as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _int(value: object) -> int | None:
    number = as_float(value)
    return round(number) if number is not None else None


def as_str(value: object) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


# ----------------------------------------------------------------------------------- collecting


def collect_report(session: Session, pipelines: Sequence[str] | None = None) -> ReportData:
    """Everything the report shows, read in the caller's session. `pipelines` limits it to those
    names (an unknown name raises NotFoundError); None means every pipeline."""
    chosen = repo.list_pipelines(session) if pipelines is None else [repo.get_pipeline(session, n) for n in pipelines]
    return ReportData(pipelines=tuple(_collect_pipeline(session, p) for p in chosen))


class VersionNumbers:
    """Model version ids → version numbers within one session, each looked up once; an id whose row
    is gone reads as None (a dash), never an error on a page."""

    def __init__(self, session: Session, pipeline: str) -> None:
        self.session = session
        self.versions = {mv.id: mv.version for mv in repo.list_model_versions(session, pipeline)}

    def __call__(self, version_id: int | None) -> int | None:
        if version_id is None:
            return None
        if version_id not in self.versions:
            try:
                self.versions[version_id] = repo.get_model_version_by_id(self.session, version_id).version
            except NotFoundError:
                return None
        return self.versions[version_id]


def _collect_pipeline(session: Session, pipeline: e.Pipeline) -> PipelineReport:
    version_of = VersionNumbers(session, pipeline.name)
    runs = reversed(repo.list_runs(session, pipeline.name, limit=MAX_RUNS))
    moves = reversed(repo.alias_history(session, pipeline.name))
    rollouts = list(reversed(repo.list_rollouts(session, pipeline.name, limit=MAX_ROLLOUTS)))
    last_rollout = {r.run_id: r for r in rollouts if r.run_id is not None}  # oldest first: the latest wins
    task = task_named(pipeline.spec.get("task"))
    return PipelineReport(
        name=pipeline.name,
        dataset=pipeline.dataset,
        champion_version=version_of(pipeline.champion_version_id),
        runs=tuple(collect_run_report(session, run, last_rollout.get(run.id), task) for run in runs),
        alias_moves=tuple(alias_move_report(m, version_of) for m in moves),
        rollouts=tuple(collect_rollout(r, version_of) for r in rollouts),
        task=task,
    )


def alias_move_report(move: e.AliasMove, version_of: Callable[[int | None], int | None]) -> AliasMoveReport:
    return AliasMoveReport(
        from_version=version_of(move.from_version_id),
        to_version=version_of(move.to_version_id),
        actor=move.actor,
        reason=move.reason,
        run_id=move.run_id,
        moved_at=move.moved_at,
    )


def collect_run_report(session: Session, run: e.Run, rollout: e.Rollout | None, pipeline_task: Task) -> RunReport:
    # Typed rows (dataset version, model version, gate verdicts) are read as entities; only the run's
    # free-form evidence goes through the defensive readers above.
    evidence = run.evidence or {}
    dataset = repo.get_dataset_version(session, run.dataset_version_id) if run.dataset_version_id else None
    candidate_version = repo.get_model_version_by_id(session, run.model_version_id) if run.model_version_id else None
    candidate = as_dict(evidence.get("candidate"))
    champion = as_dict(evidence.get("champion"))
    # the report names its task; one stored before tasks existed belongs to the pipeline's (a classifier)
    task = task_named(candidate.get("task") or pipeline_task)
    outcome = as_dict(evidence.get("outcome"))
    reason = as_str(outcome.get("reason")) or run.error
    # The gate's outcome says "awaiting the canary"; once the rollout has ended, its reason is what
    # decided the run's final status.
    if (
        rollout is not None
        and rollout.status is not e.RolloutStatus.ACTIVE
        and rollout.reason
        and as_str(outcome.get("status")) != run.status.value
    ):
        reason = rollout.reason
    return RunReport(
        run_id=run.id,
        trigger_kind=run.trigger_kind.value,
        trigger_reason=run.reason,
        event_count=len(run.event_ids),
        status=run.status.value,
        dataset=dataset.dataset if dataset else None,
        dataset_version=dataset.version if dataset else None,
        candidate_version=candidate_version.version if candidate_version else None,
        evaluated=bool(candidate),
        champion_recorded=bool(champion),
        champion_version=_int(champion.get("version")),
        champion_error=as_str(champion.get("error")),
        decision_reason=reason,
        error=run.error,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        metrics=_collect_metrics(task, candidate, champion, as_dict(evidence.get("comparisons"))),
        gate=tuple(
            GateRow(g.metric, g.check, g.verdict.value, g.reason, g.candidate_value, g.champion_value, g.threshold)
            for g in repo.gate_verdicts(session, run.id)
        ),
        quantization=_collect_quantization(evidence.get("quantization")),
        task=task,
    )


def _collect_metrics(
    task: Task, candidate: dict[str, Any], champion: dict[str, Any], comparisons: dict[str, Any]
) -> tuple[MetricPair, ...]:
    """The task's metrics for both models, each with its paired interval where a vs_champion rule
    compared it; a compared metric outside the task's list (a custom metric) follows them."""
    candidate_metrics = as_dict(candidate.get("metrics"))
    champion_metrics = as_dict(as_dict(champion.get("report")).get("metrics"))
    shown = dict(compared_metrics(task))
    for name, comparison in comparisons.items():
        higher = _bool(as_dict(comparison).get("higher_is_better"))
        if name not in shown and higher is not None:
            shown[name] = higher

    def interval(name: str) -> Interval | None:
        found = as_dict(comparisons.get(name))
        if not found:
            return None
        return Interval(
            as_float(found.get("ci_low")), as_float(found.get("ci_high")), as_float(found.get("confidence"))
        )

    return tuple(
        MetricPair(
            name, as_float(candidate_metrics.get(name)), as_float(champion_metrics.get(name)), higher, interval(name)
        )
        for name, higher in shown.items()
    )


def _collect_quantization(value: object) -> Quantization | None:
    report = as_dict(value)
    if not report:
        return None
    # the budget's metric; a report written before the budget named one budgeted accuracy
    metric = as_str(report.get("metric")) or "accuracy"
    variants = []
    for result in map(as_dict, _list(report.get("results"))):
        score = as_dict(result.get("score"))
        value = score.get("accuracy") if metric == "accuracy" else as_dict(score.get("metrics")).get(metric)
        variants.append(
            QuantizationVariant(
                variant=as_str(result.get("variant")) or DASH,
                available=_bool(result.get("available")),
                eligible=_bool(result.get("eligible")),
                reason=as_str(result.get("reason")),
                value=as_float(value),
                latency_p50_ms_b32=as_float(score.get("latency_p50_ms_b32")),
                size_bytes=as_float(score.get("size_bytes")),
            )
        )
    return Quantization(
        chosen=as_str(report.get("chosen")),
        reason=as_str(report.get("reason")),
        max_drop=as_float(report.get("max_drop", report.get("max_accuracy_drop"))),
        variants=tuple(variants),
        metric=metric,
        higher_is_better=_bool(report.get("higher_is_better")) is not False,
    )


def collect_rollout(rollout: e.Rollout, version_of: Callable[[int | None], int | None]) -> RolloutReport:
    policy = tuple(
        (str(key), _policy_value(value)) for key, value in sorted(rollout.policy.items(), key=lambda kv: kv[0])
    )
    return RolloutReport(
        id=rollout.id,
        run_id=rollout.run_id,
        candidate_version=version_of(rollout.candidate_version_id),
        champion_version=version_of(rollout.champion_version_id),
        status=rollout.status.value,
        reason=rollout.reason,
        policy=policy,
        started_at=rollout.started_at,
        finished_at=rollout.finished_at,
        steps=tuple(_collect_step(s) for s in sorted(rollout.steps, key=lambda s: s.step_index)),
    )


def _policy_value(value: object) -> str:
    if isinstance(value, list):
        return " → ".join(as_str(v) or DASH for v in value)
    return as_str(value) or DASH


def _collect_step(step: e.RolloutStep) -> StepReport:
    return StepReport(
        step_index=step.step_index,
        traffic_percent=step.traffic_percent,
        verdict=step.verdict.value if step.verdict else None,
        analysis=step.analysis,
        started_at=step.started_at,
        finished_at=step.finished_at,
    )
