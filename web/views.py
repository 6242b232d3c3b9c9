"""What the report and the dashboard show, as plain frozen data: no SQL, no HTML.

`api/report_data.py` collects these from the metadata database; `web/render.py` renders them
with the templates in `web/templates/`. Canary evidence is the domain's own typed model
(`domain.evidence.StepAnalysis`); run evidence is read into the small records below. Which
metrics a run shows, and which way is better, follow its task (`domain/task.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from domain.evidence import CanaryAttempt, StepAnalysis
from domain.task import QUALITY_METRICS, TASKS, Task
from web.canary_checks import CheckRow, check_rows

# The one metric a run is summed up by in the charts and the CLI's model list.
HEADLINE_METRIC: dict[Task, str] = {"classification": "accuracy", "regression": "rmse"}
# The costs shown beside the task's quality metrics (lower is better, whatever the task).
SHOWN_COSTS = ("latency_p99_ms", "size_bytes")


def task_named(value: object) -> Task:
    """The task a stored spec, manifest or report names; one stored before tasks existed is a classifier."""
    return next((task for task in TASKS if task == value), "classification")


def compared_metrics(task: Task) -> tuple[tuple[str, bool], ...]:
    """(metric, higher is better) for the candidate-vs-champion table: the task's quality metrics
    (domain/task.py), then the costs."""
    return (*QUALITY_METRICS[task].items(), *((cost, False) for cost in SHOWN_COSTS))


def model_metric_columns(
    pipeline_task: object, versions: Sequence[tuple[object, Mapping[str, object]]]
) -> tuple[str, ...]:
    """The quality metrics a list of model versions shows, from (manifest task, metrics) per version:
    those of the versions' tasks and the pipeline's that some version recorded, in domain/task.py's
    order; the pipeline task's headline metric when none did."""
    task = task_named(pipeline_task)
    tasks = {task, *(task_named(named) for named, _ in versions)}
    recorded = {name for _, metrics in versions for name, value in metrics.items() if value is not None}
    columns = tuple(name for t in TASKS if t in tasks for name in QUALITY_METRICS[t] if name in recorded)
    return columns or (HEADLINE_METRIC[task],)


@dataclass(frozen=True, slots=True)
class Interval:
    """The paired-bootstrap interval of candidate - champion on one metric (run evidence
    `comparisons`); a bound is None where the metric was undefined on the resampled rows."""

    low: float | None
    high: float | None
    confidence: float | None


@dataclass(frozen=True, slots=True)
class MetricPair:
    name: str
    candidate: float | None
    champion: float | None
    higher_is_better: bool
    interval: Interval | None = None  # only for metrics a vs_champion rule compared

    @property
    def delta(self) -> float | None:
        if self.candidate is None or self.champion is None:
            return None
        return self.candidate - self.champion

    @property
    def improved(self) -> bool | None:
        delta = self.delta
        if delta is None or delta == 0:
            return None
        return (delta > 0) == self.higher_is_better

    @property
    def interval_says(self) -> bool | None:
        """True when the whole interval lies on the better side of 0, False when on the worse side,
        None when it holds 0 (or is unknown): the paired comparison, not the point difference."""
        if self.interval is None or self.interval.low is None or self.interval.high is None:
            return None
        if self.interval.low > 0 or self.interval.high < 0:
            return (self.interval.low > 0) == self.higher_is_better
        return None


@dataclass(frozen=True, slots=True)
class GateRow:
    metric: str
    check: str
    verdict: str
    reason: str
    candidate: float | None
    champion: float | None
    threshold: float | None


@dataclass(frozen=True, slots=True)
class QuantizationVariant:
    variant: str
    available: bool | None
    eligible: bool | None
    reason: str | None
    value: float | None  # the budget's metric (Quantization.metric)
    latency_p50_ms_b32: float | None
    size_bytes: float | None


@dataclass(frozen=True, slots=True)
class Quantization:
    chosen: str | None
    reason: str | None
    max_drop: float | None  # how much the budget's metric may worsen against the float model
    variants: tuple[QuantizationVariant, ...]
    metric: str = "accuracy"  # reports written before the budget named its metric budgeted accuracy
    higher_is_better: bool = True


@dataclass(frozen=True, slots=True)
class RunReport:
    run_id: str
    trigger_kind: str
    trigger_reason: str | None
    event_count: int
    status: str
    dataset: str | None
    dataset_version: str | None
    candidate_version: int | None
    evaluated: bool  # the run stored candidate evidence (so a missing champion means "none yet")
    champion_recorded: bool  # the evidence names a champion (its version may still be unreadable)
    champion_version: int | None
    champion_error: str | None
    decision_reason: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    metrics: tuple[MetricPair, ...]
    gate: tuple[GateRow, ...]
    quantization: Quantization | None
    task: Task = "classification"

    @property
    def headline(self) -> MetricPair | None:
        return self.metric(HEADLINE_METRIC[self.task])

    @property
    def short_id(self) -> str:
        return self.run_id[:8]

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def metric(self, name: str) -> MetricPair | None:
        return next((m for m in self.metrics if m.name == name), None)


@dataclass(frozen=True, slots=True)
class AliasMoveReport:
    from_version: int | None
    to_version: int | None
    actor: str
    reason: str
    run_id: str | None
    moved_at: datetime


@dataclass(frozen=True, slots=True)
class StepReport:
    step_index: int
    traffic_percent: float
    verdict: str | None
    analysis: StepAnalysis
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def attempts(self) -> tuple[CanaryAttempt, ...]:
        return self.analysis.attempts

    @property
    def decisive(self) -> CanaryAttempt | None:
        return self.analysis.decisive


@dataclass(frozen=True, slots=True)
class RolloutReport:
    id: int
    run_id: str | None
    candidate_version: int | None
    champion_version: int | None
    status: str
    reason: str | None
    policy: tuple[tuple[str, str], ...]
    started_at: datetime
    finished_at: datetime | None
    steps: tuple[StepReport, ...]

    @property
    def windows(self) -> list[tuple[StepReport, int, CanaryAttempt]]:
        """Every analysed window in order: (step, its number within the step from 1, the attempt)."""
        return [(s, i, a) for s in self.steps for i, a in enumerate(s.attempts, 1)]

    @property
    def checks(self) -> list[tuple[StepReport, int, CanaryAttempt, CheckRow]]:
        """Every check of every analysed window, in order: its evidence, or the flat checks of a
        window stored before the checks were tests."""
        return [(s, i, a, c) for s, i, a in self.windows for c in check_rows(a)]

    @property
    def false_rollback_budget(self) -> float | None:
        """1 - canary.confidence of the rollout's policy: the most probability the rollout's tests
        together may have of rolling back a candidate as good as the champion (None: a policy
        stored before the checks were tests names no confidence)."""
        stored = dict(self.policy).get("confidence")
        try:
            confidence = float(stored) if stored is not None else None
        except ValueError:
            return None
        return 1.0 - confidence if confidence is not None and 0.0 < confidence < 1.0 else None


@dataclass(frozen=True, slots=True)
class PipelineReport:
    name: str
    dataset: str
    champion_version: int | None
    runs: tuple[RunReport, ...]  # oldest first
    alias_moves: tuple[AliasMoveReport, ...]  # oldest first
    rollouts: tuple[RolloutReport, ...]  # oldest first
    task: Task = "classification"

    @property
    def headline_metric(self) -> str:
        return HEADLINE_METRIC[self.task]

    def count(self, status: str) -> int:
        return sum(1 for r in self.runs if r.status == status)


@dataclass(frozen=True, slots=True)
class ReportData:
    pipelines: tuple[PipelineReport, ...]
