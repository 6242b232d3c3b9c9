"""The self-contained HTML report that `retrainer demo` writes at the end.

`collect_report(session)` reads everything from SQL through `storage.repositories` into frozen
dataclasses; `render_html(data)` turns them into one HTML file that loads nothing from anywhere:
inline CSS, charts as inline SVG drawn here, no scripts, and a Content-Security-Policy that
forbids fetching anything even if a stored string tried to. Every stored string is escaped.

The stored JSON (run evidence, rollout step analyses) has changed shape over time and aborted
steps store `{}`, so every key is read defensively: a missing or mistyped value shows as "—" and
never stops the report.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import NotFoundError
from storage import repositories as repo
from storage.db import transaction

MAX_RUNS = 1000  # list_runs' upper limit; a demo has a handful
MAX_ROLLOUTS = 1000
DASH = "—"

# (metric, higher is better) for the candidate-vs-champion table
COMPARED_METRICS: tuple[tuple[str, bool], ...] = (
    ("accuracy", True),
    ("macro_f1", True),
    ("latency_p99_ms", False),
    ("size_bytes", False),
)

# ------------------------------------------------------------------------------------ the data


@dataclass(frozen=True, slots=True)
class MetricPair:
    name: str
    candidate: float | None
    champion: float | None
    higher_is_better: bool

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
    accuracy: float | None
    latency_p50_ms_b32: float | None
    size_bytes: float | None


@dataclass(frozen=True, slots=True)
class Quantization:
    chosen: str | None
    reason: str | None
    max_accuracy_drop: float | None
    variants: tuple[QuantizationVariant, ...]


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
class VariantWindow:
    """One variant's numbers in one analysed window of a canary step."""

    version: str | None = None
    requests: int | None = None
    errors: int | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    labelled: int | None = None
    correct: int | None = None
    class_counts: tuple[tuple[str, int], ...] = ()

    @property
    def error_rate(self) -> float | None:
        if self.requests is None or self.errors is None or self.requests <= 0:
            return None
        return self.errors / self.requests


@dataclass(frozen=True, slots=True)
class CheckReport:
    metric: str | None
    verdict: str | None
    reason: str | None
    candidate_value: float | None
    champion_value: float | None
    threshold: float | None


@dataclass(frozen=True, slots=True)
class AttemptReport:
    """One analysed window of a step; the last attempt of a step decided it."""

    action: str | None
    reason: str | None
    elapsed_seconds: float | None
    at: str | None
    canary: VariantWindow
    champion: VariantWindow
    checks: tuple[CheckReport, ...]
    server_error: str | None = None  # the model server could not report this window's stats

    @property
    def psi(self) -> float | None:
        check = next((c for c in self.checks if c.metric == "prediction_psi"), None)
        return check.candidate_value if check else None


@dataclass(frozen=True, slots=True)
class StepReport:
    step_index: int
    traffic_percent: float | None
    verdict: str | None
    action: str | None
    reason: str | None
    attempts: tuple[AttemptReport, ...]
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def decisive(self) -> AttemptReport | None:
        return self.attempts[-1] if self.attempts else None


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


@dataclass(frozen=True, slots=True)
class PipelineReport:
    name: str
    dataset: str
    champion_version: int | None
    runs: tuple[RunReport, ...]  # oldest first
    alias_moves: tuple[AliasMoveReport, ...]  # oldest first
    rollouts: tuple[RolloutReport, ...]  # oldest first


@dataclass(frozen=True, slots=True)
class ReportData:
    pipelines: tuple[PipelineReport, ...]


# ------------------------------------------------------------------------------ defensive reads


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
    return PipelineReport(
        name=pipeline.name,
        dataset=pipeline.dataset,
        champion_version=version_of(pipeline.champion_version_id),
        runs=tuple(_collect_run(session, run, last_rollout.get(run.id)) for run in runs),
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
    )


def _collect_run(session: Session, run: e.Run, rollout: e.Rollout | None) -> RunReport:
    record = repo.decision_record(session, run.id)
    decision = _dict(record.get("decision"))
    dataset = _dict(decision.get("dataset"))
    candidate = _dict(decision.get("candidate"))
    champion = _dict(decision.get("champion"))
    candidate_metrics = _dict(candidate.get("metrics"))
    champion_metrics = _dict(_dict(champion.get("report")).get("metrics"))
    outcome = _dict(decision.get("outcome"))
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
        dataset=_str(dataset.get("dataset")),
        dataset_version=_str(dataset.get("version")),
        candidate_version=_int(record.get("model_version")),
        evaluated=bool(candidate),
        champion_recorded=bool(champion),
        champion_version=_int(champion.get("version")),
        champion_error=_str(champion.get("error")),
        decision_reason=reason,
        error=run.error,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        metrics=tuple(
            MetricPair(name, _float(candidate_metrics.get(name)), _float(champion_metrics.get(name)), higher)
            for name, higher in COMPARED_METRICS
        ),
        gate=tuple(
            GateRow(
                metric=_str(g.get("metric")) or DASH,
                check=_str(g.get("check")) or DASH,
                verdict=_str(g.get("verdict")) or DASH,
                reason=_str(g.get("reason")) or DASH,
                candidate=_float(g.get("candidate")),
                champion=_float(g.get("champion")),
                threshold=_float(g.get("threshold")),
            )
            for g in map(_dict, _list(decision.get("gate")))
        ),
        quantization=_collect_quantization(decision.get("quantization")),
    )


def _collect_quantization(value: object) -> Quantization | None:
    report = _dict(value)
    if not report:
        return None
    variants = []
    for result in map(_dict, _list(report.get("results"))):
        score = _dict(result.get("score"))
        variants.append(
            QuantizationVariant(
                variant=_str(result.get("variant")) or DASH,
                available=_bool(result.get("available")),
                eligible=_bool(result.get("eligible")),
                reason=_str(result.get("reason")),
                accuracy=_float(score.get("accuracy")),
                latency_p50_ms_b32=_float(score.get("latency_p50_ms_b32")),
                size_bytes=_float(score.get("size_bytes")),
            )
        )
    return Quantization(
        chosen=_str(report.get("chosen")),
        reason=_str(report.get("reason")),
        max_accuracy_drop=_float(report.get("max_accuracy_drop")),
        variants=tuple(variants),
    )


def _collect_rollout(rollout: e.Rollout, version_of: Callable[[int | None], int | None]) -> RolloutReport:
    policy = tuple(
        (str(key), _policy_value(value)) for key, value in sorted(_dict(rollout.policy).items(), key=lambda kv: kv[0])
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
    analysis = _dict(step.analysis)
    attempts = tuple(_collect_attempt(a) for a in _list(analysis.get("attempts")) if isinstance(a, dict))
    last = attempts[-1] if attempts else None
    return StepReport(
        step_index=step.step_index,
        traffic_percent=_float(step.traffic_percent),
        verdict=step.verdict.value if step.verdict else None,
        action=_str(analysis.get("action")) or (last.action if last else None),
        reason=_str(analysis.get("reason")) or (last.reason if last else None),
        attempts=attempts,
        started_at=step.started_at,
        finished_at=step.finished_at,
    )


def _collect_attempt(attempt: Mapping[str, Any]) -> AttemptReport:
    return AttemptReport(
        action=_str(attempt.get("action")),
        reason=_str(attempt.get("reason")),
        elapsed_seconds=_float(attempt.get("elapsed_seconds")),
        at=_str(attempt.get("at")),
        canary=_collect_window(attempt.get("canary")),
        champion=_collect_window(attempt.get("champion")),
        checks=tuple(
            CheckReport(
                metric=_str(c.get("metric")),
                verdict=_str(c.get("verdict")),
                reason=_str(c.get("reason")),
                candidate_value=_float(c.get("candidate_value")),
                champion_value=_float(c.get("champion_value")),
                threshold=_float(c.get("threshold")),
            )
            for c in map(_dict, _list(attempt.get("checks")))
        ),
        server_error=_str(attempt.get("server_error")),
    )


def _collect_window(value: object) -> VariantWindow:
    window = _dict(value)
    counts = tuple(
        (str(cls), count)
        for cls, count in ((k, _int(v)) for k, v in _dict(window.get("class_counts")).items())
        if count is not None
    )
    return VariantWindow(
        version=_str(window.get("version")),
        requests=_int(window.get("requests")),
        errors=_int(window.get("errors")),
        latency_p50_ms=_float(window.get("latency_p50_ms")),
        latency_p99_ms=_float(window.get("latency_p99_ms")),
        labelled=_int(window.get("labelled")),
        correct=_int(window.get("correct")),
        class_counts=counts,
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
            _version(run.candidate_version),
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
    document = render_html(data, title=title, generated_at=generated_at)
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


# ------------------------------------------------------------------------------------ rendering

CANDIDATE_COLOUR = "#1a73e8"
CHAMPION_COLOUR = "#f29900"
TRAFFIC_COLOUR = "#12b5cb"
PSI_COLOUR = "#9334e6"
REQUESTS_COLOUR = "#5f6368"

# CSP: nothing may be fetched; inline styles are the only thing allowed in.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

CSS = """
:root { --fg:#202124; --muted:#5f6368; --line:#dadce0; --bg:#fff; --soft:#f8f9fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 24px 32px 48px; max-width: 1280px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 40px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 28px 0 8px; }
h4 { font-size: 14px; margin: 16px 0 6px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
a { color: #1a73e8; text-decoration: none; }
a:hover { text-decoration: underline; }
.muted { color: var(--muted); }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
table { border-collapse: collapse; margin: 6px 0 12px; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; font-size: 12.5px; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.fail td { background: #fdf0ef; }
tr.pass td { background: #f3faf5; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         white-space: nowrap; background: #f1f3f4; color: var(--muted); }
.good { background: #e6f4ea; color: #137333; }
.bad { background: #fce8e6; color: #a50e0e; }
.warn { background: #fef7e0; color: #b06000; }
.info { background: #e8f0fe; color: #174ea6; }
.better { color: #137333; }
.worse { color: #a50e0e; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin: 12px 0; }
.card > h3:first-child { margin-top: 4px; }
td.time { white-space: nowrap; }
.summary { display: flex; flex-wrap: wrap; gap: 8px 24px; margin: 8px 0; }
.summary div { min-width: 120px; }
.summary b { display: block; font-size: 18px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0; }
.split { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.split > table { width: auto; min-width: 420px; flex: 1; }
svg.chart { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #3c4043; }
svg.chart text.title { font-size: 12px; font-weight: 600; }
svg.chart .grid { stroke: var(--line); stroke-width: 1; }
svg.chart .axis { stroke: #9aa0a6; stroke-width: 1; }
nav ul { margin: 4px 0; padding-left: 20px; }
details > summary { cursor: pointer; }
pre { white-space: pre-wrap; background: var(--soft); padding: 8px; border-radius: 4px; }
footer { margin-top: 48px; color: var(--muted); font-size: 12px; }
"""

_GOOD = {"pass", "promoted", "promote", "advance", "champion"}
_BAD = {"fail", "failed", "rejected", "rolled_back", "rollback", "aborted"}
_WARN = {"repeat", "wait", "skipped"}
_INFO = {"canary", "running", "queued", "active"}


def _e(value: object) -> str:
    """Escaped text; None and empty strings become a dash."""
    if value is None:
        return DASH
    text = str(value)
    return html.escape(text, quote=True) if text.strip() else DASH


def _tone(word: str | None) -> str:
    if word in _GOOD:
        return "good"
    if word in _BAD:
        return "bad"
    if word in _WARN:
        return "warn"
    if word in _INFO:
        return "info"
    return ""


def _badge(word: str | None) -> str:
    return f'<span class="badge {_tone(word)}">{_e(word)}</span>'


def _row_class(verdict: str | None) -> str:
    return {"pass": ' class="pass"', "fail": ' class="fail"'}.get(verdict or "", "")


def _version(version: int | None) -> str:
    return DASH if version is None else f"v{version}"


def _time(moment: datetime | None) -> str:
    if moment is None:
        return DASH
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso_time(text: str | None) -> str:
    if text is None:
        return DASH
    try:
        return _time(datetime.fromisoformat(text))
    except ValueError:
        return text


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _num(value: float | None, digits: int = 4) -> str:
    return DASH if value is None else f"{value:.{digits}g}"


def _bytes(value: float | None) -> str:
    if value is None:
        return DASH
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop always returns


def _percent(fraction: float | None) -> str:
    return DASH if fraction is None else f"{fraction * 100:.2f} %"


def _ms(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.0f} ms" if abs(value) >= 100 else f"{value:.2f} ms"


def _metric(name: str, value: float | None) -> str:
    if name == "size_bytes":
        return _bytes(value)
    if name.startswith("latency_"):
        return _ms(value)
    return DASH if value is None else f"{value:.4f}"


def _signed(name: str, delta: float | None) -> str:
    if delta is None:
        return DASH
    sign = "+" if delta > 0 else "\u2212" if delta < 0 else "\u00b1"  # minus sign, plus-minus
    return sign + _metric(name, abs(delta))


def _table(headers: Sequence[str], rows: Iterable[str], *, numeric: Sequence[int] = ()) -> str:
    num = ' class="num"'
    head = "".join(f"<th{num if i in numeric else ''}>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join(rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="muted">none recorded</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(content: str, *, num: bool = False) -> str:
    """A cell; `content` must already be escaped HTML."""
    return f'<td class="num">{content}</td>' if num else f"<td>{content}</td>"


def _td_time(text: str) -> str:
    return f'<td class="time">{_e(text)}</td>'


def _anchor(prefix: str, key: str) -> str:
    return html.escape(f"{prefix}-{key}", quote=True)


# ----------------------------------------------------------------------------------- SVG charts


@dataclass(frozen=True, slots=True)
class _Series:
    name: str
    colour: str
    values: tuple[float | None, ...]


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times 10^k that is >= value (a readable axis top)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * power * (1 + 1e-9):
            return step * power
    return 10.0 * power  # pragma: no cover - 10 always fits


def _legend_step(name: str) -> float:
    return 24 + 6.5 * len(name)


def _chart_width(title: str, series: Sequence[_Series], minimum: int) -> int:
    """Wide enough for the plot, the title and the legend (text is not measured: estimated)."""
    legend = 58 + sum(_legend_step(s.name) for s in series) + 8
    return math.ceil(max(minimum, 7 * len(title) + 24, legend))


def _svg_open(title: str, width: int, height: int) -> list[str]:
    label = _e(title)
    return [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{label}">',
        f"<title>{label}</title>",
        f'<text class="title" x="10" y="17">{label}</text>',
    ]


def _legend(series: Sequence[_Series], x: float, y: float) -> list[str]:
    parts = []
    for s in series:
        parts.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{s.colour}"></rect>')
        parts.append(f'<text x="{x + 14:.1f}" y="{y:.1f}">{_e(s.name)}</text>')
        x += _legend_step(s.name)
    return parts


def _y_axis(
    left: float, right: float, top: float, bottom: float, y_max: float, fmt: Callable[[float], str]
) -> list[str]:
    parts = []
    mantissa = y_max / 10.0 ** math.floor(math.log10(y_max)) if y_max > 0 else 1.0
    ticks = 5 if any(math.isclose(mantissa, m) for m in (2.5, 5.0)) else 4  # round tick values
    for tick in range(ticks + 1):
        fraction = tick / ticks
        y = bottom - fraction * (bottom - top)
        parts.append(f'<line class="grid" x1="{left:.1f}" y1="{y:.1f}" x2="{right:.1f}" y2="{y:.1f}"></line>')
        label = _e(fmt(fraction * y_max))
        parts.append(f'<text x="{left - 4:.1f}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    parts.append(f'<line class="axis" x1="{left:.1f}" y1="{top:.1f}" x2="{left:.1f}" y2="{bottom:.1f}"></line>')
    return parts


def _no_data(title: str) -> str:
    return f'<p class="muted">{_e(title)}: no data</p>'


def _line_chart(
    title: str,
    x_labels: Sequence[str],
    series: Sequence[_Series],
    *,
    y_max: float | None = None,
    fmt: Callable[[float], str] = lambda v: f"{v:.3g}",
) -> str:
    """Values across steps, one line per series; a missing value breaks the line."""
    present = [v for s in series for v in s.values if v is not None]
    if not x_labels or not present:
        return _no_data(title)
    top_value = y_max if y_max is not None else _nice_ceiling(max(max(present), 0.0))
    width, height = _chart_width(title, series, 70 * len(x_labels) + 80), 210
    left, right, top, bottom = 58.0, width - 14.0, 30.0, height - 48.0
    n = len(x_labels)

    def x_at(i: int) -> float:
        return left + (right - left) * (i + 0.5) / n

    def y_at(v: float) -> float:
        return bottom - max(0.0, min(v, top_value)) / top_value * (bottom - top)

    parts = _svg_open(title, width, height)
    parts += _y_axis(left, right, top, bottom, top_value, fmt)
    for i, label in enumerate(x_labels):
        parts.append(f'<text x="{x_at(i):.1f}" y="{bottom + 15:.1f}" text-anchor="middle">{_e(label)}</text>')
    for s in series:
        run: list[str] = []
        segments: list[list[str]] = [run]
        for i, v in enumerate(s.values[:n]):
            if v is None:
                run = []
                segments.append(run)
                continue
            run.append(f"{x_at(i):.1f},{y_at(v):.1f}")
        for segment in segments:
            if len(segment) > 1:
                points = " ".join(segment)
                parts.append(
                    f'<polyline fill="none" stroke="{s.colour}" stroke-width="2" points="{points}"></polyline>'
                )
        for i, v in enumerate(s.values[:n]):
            if v is not None:
                tip = _e(f"{s.name}, {x_labels[i]}: {fmt(v)}")
                parts.append(
                    f'<circle cx="{x_at(i):.1f}" cy="{y_at(v):.1f}" r="3.5" fill="{s.colour}">'
                    f"<title>{tip}</title></circle>"
                )
    parts += _legend(series, left, height - 10.0)
    parts.append("</svg>")
    return "".join(parts)


def _bar_chart(
    title: str,
    categories: Sequence[str],
    series: Sequence[_Series],
    *,
    y_max: float | None = None,
    fmt: Callable[[float], str] = lambda v: f"{v:.3g}",
) -> str:
    """Grouped vertical bars: one group per category, one bar per series; values printed on top."""
    present = [v for s in series for v in s.values if v is not None]
    if not categories or not present:
        return _no_data(title)
    top_value = y_max if y_max is not None else _nice_ceiling(max(max(present), 0.0))
    group_width = max(40 * len(series) + 28, 64)
    width, height = _chart_width(title, series, group_width * len(categories) + 80), 210
    left, right, top, bottom = 58.0, width - 14.0, 30.0, height - 48.0
    slot = (right - left) / len(categories)
    bar = min(40.0, (slot - 16) / max(len(series), 1))
    parts = _svg_open(title, width, height)
    parts += _y_axis(left, right, top, bottom, top_value, fmt)
    for c, category in enumerate(categories):
        centre = left + slot * (c + 0.5)
        parts.append(f'<text x="{centre:.1f}" y="{bottom + 15:.1f}" text-anchor="middle">{_e(category)}</text>')
        first = centre - bar * len(series) / 2
        for k, s in enumerate(series):
            value = s.values[c] if c < len(s.values) else None
            x = first + k * bar
            if value is None:
                parts.append(f'<text x="{x + bar / 2:.1f}" y="{bottom - 4:.1f}" text-anchor="middle">{DASH}</text>')
                continue
            h = max(0.0, min(value, top_value)) / top_value * (bottom - top)
            tip = _e(f"{s.name}, {category}: {fmt(value)}")
            parts.append(
                f'<rect x="{x + 1:.1f}" y="{bottom - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                f'fill="{s.colour}"><title>{tip}</title></rect>'
            )
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{bottom - h - 3:.1f}" text-anchor="middle">{_e(fmt(value))}</text>'
            )
    parts += _legend(series, left, height - 10.0)
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------- sections


def render_html(data: ReportData, *, title: str = "Retrainer demo report", generated_at: datetime | None = None) -> str:
    """One self-contained HTML document: no scripts, no external resources, all text escaped."""
    generated = generated_at or datetime.now(UTC)
    body = [
        "<header>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">Generated {_e(_time(generated))} · {len(data.pipelines)} pipeline(s)</p>',
        "</header>",
    ]
    if not data.pipelines:
        body.append('<p class="muted">No pipelines recorded yet.</p>')
    else:
        links = "".join(f'<li><a href="#{_anchor("pipeline", p.name)}">{_e(p.name)}</a></li>' for p in data.pipelines)
        body.append(f"<nav><ul>{links}</ul></nav>")
        body += [_pipeline_section(p) for p in data.pipelines]
    body.append(
        "<footer>Written by <code>retrainer</code> from its metadata database: every number here is a row "
        "(runs, gate verdicts, alias history, rollout steps).</footer>"
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{html.escape(CSP, quote=True)}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )


def _pipeline_section(p: PipelineReport) -> str:
    promoted = sum(1 for r in p.runs if r.status == e.RunStatus.PROMOTED.value)
    rejected = sum(1 for r in p.runs if r.status == e.RunStatus.REJECTED.value)
    parts = [
        f'<section id="{_anchor("pipeline", p.name)}">',
        f"<h2>Pipeline {_e(p.name)}</h2>",
        '<div class="summary">',
        f"<div>dataset<b>{_e(p.dataset)}</b></div>",
        f"<div>champion<b>{_e(_version(p.champion_version))}</b></div>",
        f"<div>runs<b>{len(p.runs)}</b></div>",
        f"<div>promoted<b>{promoted}</b></div>",
        f"<div>rejected<b>{rejected}</b></div>",
        f"<div>canary rollouts<b>{len(p.rollouts)}</b></div>",
        "</div>",
        "<h3>Runs</h3>",
        _runs_table(p),
    ]
    if p.runs:
        parts.append(
            _bar_chart(
                "accuracy per run: candidate vs champion (same test rows)",
                [r.short_id for r in p.runs],
                [
                    _Series("candidate", CANDIDATE_COLOUR, tuple(_metric_value(r, "accuracy", True) for r in p.runs)),
                    _Series("champion", CHAMPION_COLOUR, tuple(_metric_value(r, "accuracy", False) for r in p.runs)),
                ],
                y_max=1.0,
                fmt=lambda v: f"{v:.3f}",
            )
        )
    parts += [_run_section(r) for r in p.runs]
    parts += ["<h3>Champion alias history</h3>", _alias_table(p.alias_moves)]
    parts.append("<h3>Canary rollouts</h3>")
    if not p.rollouts:
        parts.append('<p class="muted">No canary rollouts.</p>')
    parts += [_rollout_section(r, {run.run_id for run in p.runs}) for r in p.rollouts]
    parts.append("</section>")
    return "\n".join(parts)


def _metric_value(run: RunReport, name: str, candidate: bool) -> float | None:
    pair = run.metric(name)
    if pair is None:
        return None
    return pair.candidate if candidate else pair.champion


def _runs_table(p: PipelineReport) -> str:
    rows = []
    for r in p.runs:
        trigger = _badge(r.trigger_kind)
        if r.trigger_reason:
            trigger += f" {_e(r.trigger_reason)}"
        if r.event_count:
            trigger += f' <span class="muted">({r.event_count} event{"s" if r.event_count != 1 else ""})</span>'
        rows.append(
            "<tr>"
            + _td(f'<a class="mono" href="#{_anchor("run", r.run_id)}">{_e(r.short_id)}</a>')
            + _td_time(_time(r.created_at))
            + _td(trigger)
            + _td(_e(r.dataset_version))
            + _td(_e(_version(r.candidate_version)))
            + _td(_e(_version(r.champion_version)))
            + _td(_badge(r.status))
            + _td(_e(r.decision_reason))
            + _td(_e(_duration(r.duration_seconds)), num=True)
            + "</tr>"
        )
    headers = ["run", "created", "trigger", "dataset", "candidate", "champion", "status", "decision reason", "duration"]
    return _table(headers, rows, numeric=(8,))


def _run_section(r: RunReport) -> str:
    champion = _version(r.champion_version)
    if r.champion_version is None and r.evaluated and not r.champion_recorded:
        champion = "none (first model)"
    parts = [
        f'<div class="card" id="{_anchor("run", r.run_id)}">',
        f'<h3>Run <span class="mono">{_e(r.short_id)}</span> · candidate {_e(_version(r.candidate_version))} '
        f"vs champion {_e(champion)} · {_badge(r.status)}</h3>",
        f'<p class="muted">run id <span class="mono">{_e(r.run_id)}</span> · dataset {_e(r.dataset)} '
        f"{_e(r.dataset_version)} · started {_e(_time(r.started_at))} · finished {_e(_time(r.finished_at))}</p>",
        f"<p><b>Decision:</b> {_e(r.decision_reason)}</p>",
    ]
    if r.error and r.error != r.decision_reason:
        parts.append(f"<pre>{_e(r.error)}</pre>")
    if r.champion_error:
        parts.append(f'<p class="worse">Champion not evaluated: {_e(r.champion_error)}</p>')
    parts.append("<h4>Candidate vs champion (same held-out rows)</h4>")
    metric_rows = []
    for m in r.metrics:
        tone = "" if m.improved is None else (' class="better"' if m.improved else ' class="worse"')
        metric_rows.append(
            "<tr>"
            + _td(_e(m.name))
            + _td(_e(_metric(m.name, m.candidate)), num=True)
            + _td(_e(_metric(m.name, m.champion)), num=True)
            + f'<td class="num"><span{tone}>{_e(_signed(m.name, m.delta))}</span></td>'
            + "</tr>"
        )
    accuracy = r.metric("accuracy")
    chart = _bar_chart(
        "accuracy",
        ["accuracy"],
        [
            _Series("candidate", CANDIDATE_COLOUR, (accuracy.candidate if accuracy else None,)),
            _Series("champion", CHAMPION_COLOUR, (accuracy.champion if accuracy else None,)),
        ],
        y_max=1.0,
        fmt=lambda v: f"{v:.4f}",
    )
    parts.append(
        f'<div class="split">{_table(["metric", "candidate", "champion", "Δ"], metric_rows, numeric=(1, 2, 3))}'
        f"{chart}</div>"
    )
    parts.append("<h4>Promotion gate</h4>")
    gate_rows = [
        f"<tr{_row_class(g.verdict)}>"
        + _td(_e(g.metric))
        + _td(_e(g.check))
        + _td(_badge(g.verdict))
        + _td(_e(_num(g.candidate)), num=True)
        + _td(_e(_num(g.champion)), num=True)
        + _td(_e(_num(g.threshold)), num=True)
        + _td(_e(g.reason))
        + "</tr>"
        for g in r.gate
    ]
    headers = ["metric", "check", "verdict", "candidate", "champion", "threshold", "reason"]
    parts.append(_table(headers, gate_rows, numeric=(3, 4, 5)))
    parts.append("<h4>Quantization</h4>")
    parts.append(_quantization(r.quantization))
    parts.append("</div>")
    return "\n".join(parts)


def _quantization(q: Quantization | None) -> str:
    if q is None:
        return f'<p class="muted">{DASH} no quantization report</p>'
    limit = "" if q.max_accuracy_drop is None else f" (max accuracy drop {q.max_accuracy_drop * 100:.2g} %)"
    lines = [f"<p>chosen <b>{_e(q.chosen)}</b>{_e(limit) if limit else ''}: {_e(q.reason)}</p>"]
    if q.variants:
        rows = [
            f"<tr{_row_class('pass') if v.variant == q.chosen else ''}>"
            + _td(_e(v.variant))
            + _td(_e(_yes_no(v.available)))
            + _td(_e(_yes_no(v.eligible)))
            + _td(_e(_metric("accuracy", v.accuracy)), num=True)
            + _td(_e(_ms(v.latency_p50_ms_b32)), num=True)
            + _td(_e(_bytes(v.size_bytes)), num=True)
            + _td(_e(v.reason))
            + "</tr>"
            for v in q.variants
        ]
        headers = ["variant", "available", "eligible", "accuracy", "p50 latency (batch 32)", "size", "reason"]
        lines.append(_table(headers, rows, numeric=(3, 4, 5)))
    return "".join(lines)


def _yes_no(value: bool | None) -> str:
    return DASH if value is None else ("yes" if value else "no")


def _alias_table(moves: Sequence[AliasMoveReport]) -> str:
    rows = [
        "<tr>"
        + _td_time(_time(m.moved_at))
        + _td(_e(_version(m.from_version) if m.from_version is not None else "none"))
        + _td(_e(_version(m.to_version) if m.to_version is not None else "none"))
        + _td(_e(m.actor))
        + _td(_run_link(m.run_id))
        + _td(_e(m.reason))
        + "</tr>"
        for m in moves
    ]
    return _table(["time", "from", "to", "actor", "run", "reason"], rows)


def _run_link(run_id: str | None, known: set[str] | None = None) -> str:
    if run_id is None:
        return DASH
    if known is not None and run_id not in known:
        return f'<span class="mono">{_e(run_id[:8])}</span>'
    return f'<a class="mono" href="#{_anchor("run", run_id)}">{_e(run_id[:8])}</a>'


def _rollout_section(r: RolloutReport, known_runs: set[str]) -> str:
    parts = [
        f'<div class="card" id="{_anchor("rollout", str(r.id))}">',
        f"<h3>Rollout #{r.id} · candidate {_e(_version(r.candidate_version))} vs champion "
        f"{_e(_version(r.champion_version))} · {_badge(r.status)}</h3>",
        f'<p class="muted">run {_run_link(r.run_id, known_runs)} · started {_e(_time(r.started_at))} · '
        f"finished {_e(_time(r.finished_at))}</p>",
        f"<p><b>Outcome:</b> {_e(r.reason)}</p>",
    ]
    if r.policy:
        policy = " · ".join(f"{_e(k)}: {_e(v)}" for k, v in r.policy)
        parts.append(f'<p class="muted">policy: {policy}</p>')
    if not r.steps:
        parts.append('<p class="muted">No steps recorded.</p></div>')
        return "\n".join(parts)
    step_rows = []
    for s in r.steps:
        d = s.decisive
        canary, champion = (d.canary, d.champion) if d else (VariantWindow(), VariantWindow())
        step_rows.append(
            f"<tr{_row_class(s.verdict)}>"
            + _td(str(s.step_index), num=True)
            + _td(_e(_traffic(s.traffic_percent)), num=True)
            + _td(_badge(s.verdict) if s.verdict else DASH)
            + _td(_badge(s.action) if s.action else DASH)
            + _td(str(len(s.attempts)), num=True)
            + _td(f"{_e(canary.requests)} / {_e(champion.requests)}", num=True)
            + _td(f"{_e(_percent(canary.error_rate))} / {_e(_percent(champion.error_rate))}", num=True)
            + _td(f"{_e(_ms(canary.latency_p99_ms))} / {_e(_ms(champion.latency_p99_ms))}", num=True)
            + _td(_e(_num(d.psi if d else None, 3)), num=True)
            + _td(_e(s.reason))
            + "</tr>"
        )
    headers = [
        "step",
        "traffic",
        "verdict",
        "action",
        "windows",
        "requests canary / champion",
        "error rate canary / champion",
        "p99 canary / champion",
        "PSI",
        "reason",
    ]
    parts += ["<h4>Steps</h4>", _table(headers, step_rows, numeric=(0, 1, 4, 5, 6, 7, 8))]
    parts += ["<h4>Across steps</h4>", f'<div class="charts">{_rollout_charts(r.steps)}</div>']
    window_rows = [
        "<tr>"
        + _td(str(s.step_index), num=True)
        + _td(str(i + 1), num=True)
        + _td_time(_iso_time(a.at))
        + _td(_e(_duration(a.elapsed_seconds)), num=True)
        + _td(_badge(a.action) if a.action else DASH)
        + _td(f"{_e(a.canary.requests)} / {_e(a.champion.requests)}", num=True)
        + _td(f"{_e(_ms(a.canary.latency_p99_ms))} / {_e(_ms(a.champion.latency_p99_ms))}", num=True)
        + _td(_e(a.reason) + (f'<br><span class="worse">server: {_e(a.server_error)}</span>' if a.server_error else ""))
        + "</tr>"
        for s in r.steps
        for i, a in enumerate(s.attempts)
    ]
    headers = ["step", "window", "at", "elapsed", "action", "requests canary / champion", "p99", "reason"]
    parts += ["<h4>Analysed windows</h4>", _table(headers, window_rows, numeric=(0, 1, 3, 5, 6))]
    check_rows = [
        f"<tr{_row_class(c.verdict)}>"
        + _td(str(s.step_index), num=True)
        + _td(str(i + 1), num=True)
        + _td(_badge(a.action) if a.action else DASH)
        + _td(_e(c.metric))
        + _td(_badge(c.verdict) if c.verdict else DASH)
        + _td(_e(_num(c.candidate_value)), num=True)
        + _td(_e(_num(c.champion_value)), num=True)
        + _td(_e(_num(c.threshold)), num=True)
        + _td(_e(c.reason))
        + "</tr>"
        for s in r.steps
        for i, a in enumerate(s.attempts)
        for c in a.checks
    ]
    headers = ["step", "window", "action", "check", "verdict", "canary", "champion", "threshold", "reason"]
    parts += ["<h4>Canary checks</h4>", _table(headers, check_rows, numeric=(0, 1, 5, 6, 7))]
    parts.append("</div>")
    return "\n".join(parts)


def _traffic(percent: float | None) -> str:
    return DASH if percent is None else f"{percent:g} %"


def _rollout_charts(steps: Sequence[StepReport]) -> str:
    labels = [f"step {s.step_index}" for s in steps]
    windows = [s.decisive for s in steps]

    def values(pick: Callable[[AttemptReport], float | int | None]) -> tuple[float | None, ...]:
        picked = (pick(w) if w is not None else None for w in windows)
        return tuple(None if v is None else float(v) for v in picked)

    charts = [
        _line_chart(
            "canary traffic (%)",
            labels,
            [_Series("canary traffic", TRAFFIC_COLOUR, tuple(s.traffic_percent for s in steps))],
            y_max=100.0,
            fmt=lambda v: f"{v:g} %",
        ),
        _line_chart(
            "error rate",
            labels,
            [
                _Series("canary", CANDIDATE_COLOUR, values(lambda w: w.canary.error_rate)),
                _Series("champion", CHAMPION_COLOUR, values(lambda w: w.champion.error_rate)),
            ],
            y_max=_nice_ceiling(max([v for v in _error_rates(windows) if v is not None] + [0.01])),
            fmt=lambda v: f"{v * 100:.2g} %",
        ),
        _line_chart(
            "p99 latency (ms)",
            labels,
            [
                _Series("canary", CANDIDATE_COLOUR, values(lambda w: w.canary.latency_p99_ms)),
                _Series("champion", CHAMPION_COLOUR, values(lambda w: w.champion.latency_p99_ms)),
            ],
            fmt=lambda v: f"{v:.3g}",
        ),
        _line_chart(
            "requests in the deciding window",
            labels,
            [
                _Series("canary", CANDIDATE_COLOUR, values(lambda w: w.canary.requests)),
                _Series("champion", CHAMPION_COLOUR, values(lambda w: w.champion.requests)),
            ],
            fmt=lambda v: f"{v:.0f}",
        ),
    ]
    psi = values(lambda w: w.psi)
    if any(v is not None for v in psi):
        charts.append(
            _line_chart("prediction drift (PSI)", labels, [_Series("PSI", PSI_COLOUR, psi)], fmt=lambda v: f"{v:.2g}")
        )
    return "".join(charts)


def _error_rates(windows: Sequence[AttemptReport | None]) -> list[float | None]:
    return [r for w in windows if w is not None for r in (w.canary.error_rate, w.champion.error_rate)]
