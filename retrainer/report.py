"""The self-contained HTML report that `retrainer demo` writes at the end: collected here, rendered
by `web.render` (Jinja2 templates in `web/templates/`, shared with the dashboard).

`collect_report(session)` reads everything from SQL into the frozen views of `web/views.py`;
`write_report` renders them and writes the file atomically. Rows with a typed entity are read as
such: a step's canary analysis is a `domain.evidence.StepAnalysis` (older rows were migrated by
revision 0003), the gate is the run's `GateVerdict`s, the dataset and model versions their
entities. Run evidence (`runs.evidence`, written by `flows/pipeline.py`) is still free-form JSON,
so its few keys are read with the small helpers below: a missing or mistyped value shows as a dash.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import NotFoundError
from domain.task import Task
from storage import repositories as repo
from storage.db import transaction
from web.canary_checks import DASH
from web.render import render_report, version
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


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _int(value: object) -> int | None:
    number = _float(value)
    return round(number) if number is not None else None


def _str(value: object) -> str | None:
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


def _collect_pipeline(session: Session, pipeline: e.Pipeline) -> PipelineReport:
    versions = {mv.id: mv.version for mv in repo.list_model_versions(session, pipeline.name)}

    def version_of(version_id: int | None) -> int | None:
        if version_id is None:
            return None
        if version_id not in versions:
            try:
                versions[version_id] = repo.get_model_version_by_id(session, version_id).version
            except NotFoundError:
                return None
        return versions[version_id]

    runs = reversed(repo.list_runs(session, pipeline.name, limit=MAX_RUNS))
    moves = reversed(repo.alias_history(session, pipeline.name))
    rollouts = list(reversed(repo.list_rollouts(session, pipeline.name, limit=MAX_ROLLOUTS)))
    last_rollout = {r.run_id: r for r in rollouts if r.run_id is not None}  # oldest first: the latest wins
    task = task_named(pipeline.spec.get("task"))
    return PipelineReport(
        name=pipeline.name,
        dataset=pipeline.dataset,
        champion_version=version_of(pipeline.champion_version_id),
        runs=tuple(_collect_run(session, run, last_rollout.get(run.id), task) for run in runs),
        alias_moves=tuple(
            AliasMoveReport(
                from_version=version_of(m.from_version_id),
                to_version=version_of(m.to_version_id),
                actor=m.actor,
                reason=m.reason,
                run_id=m.run_id,
                moved_at=m.moved_at,
            )
            for m in moves
        ),
        rollouts=tuple(_collect_rollout(r, version_of) for r in rollouts),
        task=task,
    )


def _collect_run(session: Session, run: e.Run, rollout: e.Rollout | None, pipeline_task: Task) -> RunReport:
    # Typed rows (dataset version, model version, gate verdicts) are read as entities; only the run's
    # free-form evidence goes through the defensive readers above.
    evidence = run.evidence or {}
    dataset = repo.get_dataset_version(session, run.dataset_version_id) if run.dataset_version_id else None
    candidate_version = repo.get_model_version_by_id(session, run.model_version_id) if run.model_version_id else None
    candidate = _dict(evidence.get("candidate"))
    champion = _dict(evidence.get("champion"))
    # the report names its task; one stored before tasks existed belongs to the pipeline's (a classifier)
    task = task_named(candidate.get("task") or pipeline_task)
    outcome = _dict(evidence.get("outcome"))
    reason = _str(outcome.get("reason")) or run.error
    # The gate's outcome says "awaiting the canary"; once the rollout has ended, its reason is what
    # decided the run's final status.
    if (
        rollout is not None
        and rollout.status is not e.RolloutStatus.ACTIVE
        and rollout.reason
        and _str(outcome.get("status")) != run.status.value
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
        champion_error=_str(champion.get("error")),
        decision_reason=reason,
        error=run.error,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        metrics=_collect_metrics(task, candidate, champion, _dict(evidence.get("comparisons"))),
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
    candidate_metrics = _dict(candidate.get("metrics"))
    champion_metrics = _dict(_dict(champion.get("report")).get("metrics"))
    shown = dict(compared_metrics(task))
    for name, comparison in comparisons.items():
        higher = _bool(_dict(comparison).get("higher_is_better"))
        if name not in shown and higher is not None:
            shown[name] = higher

    def interval(name: str) -> Interval | None:
        found = _dict(comparisons.get(name))
        if not found:
            return None
        return Interval(_float(found.get("ci_low")), _float(found.get("ci_high")), _float(found.get("confidence")))

    return tuple(
        MetricPair(
            name, _float(candidate_metrics.get(name)), _float(champion_metrics.get(name)), higher, interval(name)
        )
        for name, higher in shown.items()
    )


def _collect_quantization(value: object) -> Quantization | None:
    report = _dict(value)
    if not report:
        return None
    # the budget's metric; a report written before the budget named one budgeted accuracy
    metric = _str(report.get("metric")) or "accuracy"
    variants = []
    for result in map(_dict, _list(report.get("results"))):
        score = _dict(result.get("score"))
        value = score.get("accuracy") if metric == "accuracy" else _dict(score.get("metrics")).get(metric)
        variants.append(
            QuantizationVariant(
                variant=_str(result.get("variant")) or DASH,
                available=_bool(result.get("available")),
                eligible=_bool(result.get("eligible")),
                reason=_str(result.get("reason")),
                value=_float(value),
                latency_p50_ms_b32=_float(score.get("latency_p50_ms_b32")),
                size_bytes=_float(score.get("size_bytes")),
            )
        )
    return Quantization(
        chosen=_str(report.get("chosen")),
        reason=_str(report.get("reason")),
        max_drop=_float(report.get("max_drop", report.get("max_accuracy_drop"))),
        variants=tuple(variants),
        metric=metric,
        higher_is_better=_bool(report.get("higher_is_better")) is not False,
    )


def _collect_rollout(rollout: e.Rollout, version_of: Callable[[int | None], int | None]) -> RolloutReport:
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
        return " → ".join(_str(v) or DASH for v in value)
    return _str(value) or DASH


def _collect_step(step: e.RolloutStep) -> StepReport:
    return StepReport(
        step_index=step.step_index,
        traffic_percent=step.traffic_percent,
        verdict=step.verdict.value if step.verdict else None,
        analysis=step.analysis,
        started_at=step.started_at,
        finished_at=step.finished_at,
    )


# ------------------------------------------------------------------------------ the CLI's table


def runs_table_rows(data: ReportData) -> list[tuple[str, ...]]:
    """(pipeline, run, trigger, dataset, version, status, reason) per run, pipelines by name and
    runs oldest first: the rows of the CLI's closing table."""
    return [
        (
            pipeline.name,
            run.short_id,
            run.trigger_kind,
            run.dataset_version or DASH,
            version(run.candidate_version),
            run.status,
            run.decision_reason or DASH,
        )
        for pipeline in data.pipelines
        for run in pipeline.runs
    ]


# -------------------------------------------------------------------------------------- writing


def write_report(
    sessions: sessionmaker[Session],
    path: Path,
    *,
    pipelines: Sequence[str] | None = None,
    title: str = "Retrainer demo report",
    generated_at: datetime | None = None,
) -> Path:
    """Collects, renders and writes the report atomically (a reader never sees half a file)."""
    with transaction(sessions) as session:
        data = collect_report(session, pipelines)
    document = render_report(data, title=title, generated_at=generated_at)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(document)
        Path(tmp).chmod(0o644)  # mkstemp makes it private; a report is meant to be opened and shared
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
