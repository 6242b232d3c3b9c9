"""The dashboard's pages as data (`web/dashboard_views.py`), read in the caller's session.

Each page reads only what it shows: the pipelines page the last few runs of each pipeline and
its active rollout, a run page that run (`api.report_data.collect_run_report`, the report's own
reader), so a page costs the same with ten runs in the database as with a hundred thousand.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy.orm import Session

from api.report_data import (
    VersionNumbers,
    alias_move_report,
    as_dict,
    as_float,
    as_str,
    collect_rollout,
    collect_run_report,
)
from domain import entities as e
from storage import repositories as repo
from web.dashboard_views import EpochPoint, EventRow, ModelsPage, PipelineCard, RunPage, RunRow
from web.views import HEADLINE_METRIC, RolloutReport, task_named

RECENT_RUNS = 5
MODELS_SHOWN = 50  # the models page: the newest versions and alias moves, not a history that grows forever
PIPELINES_PER_PAGE = 10  # the pipelines page costs a few queries per card: a page is bounded, not the registry
ROLLOUTS_SEARCHED = 50  # a run's rollout is among its pipeline's latest ones


def _run_row(run: e.Run, version_of: VersionNumbers) -> RunRow:
    return RunRow(
        run_id=run.id,
        status=run.status.value,
        trigger_kind=run.trigger_kind.value,
        reason=run.reason,
        candidate_version=version_of(run.model_version_id),
        created_at=run.created_at,
        finished_at=run.finished_at,
    )


def _aware(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _next_run(cron: str, timezone: str, now: datetime) -> datetime | None:
    try:
        following: datetime = croniter(cron, now.astimezone(ZoneInfo(timezone))).get_next(datetime)
    except (ValueError, KeyError):  # a spec stored before its schedule was validated: no next run
        return None
    return following


class _VersionsOnDemand(VersionNumbers):
    """Version numbers looked up on first use: a card shows a handful of versions, so it never
    reads the pipeline's whole model history (which grows with every run)."""

    def __init__(self, session: Session, known: dict[int, int] | None = None) -> None:  # no super(): no preload
        self.session = session
        self.versions = dict(known or {})


def pipeline_cards(
    session: Session, now: datetime, *, offset: int = 0, limit: int = PIPELINES_PER_PAGE
) -> tuple[tuple[PipelineCard, ...], int]:
    """A page of pipelines (by name) and how many there are in all; each card: champion, last runs,
    active rollout, freeze and cooldown, schedule and next run."""
    pipelines = repo.list_pipelines(session)
    cards = []
    for pipeline in sorted(pipelines, key=lambda p: p.name)[offset : offset + limit]:
        version_of = _VersionsOnDemand(session)
        spec = pipeline.spec
        schedule = as_dict(as_dict(spec.get("triggers")).get("schedule"))
        cron, timezone = as_str(schedule.get("cron")), as_str(schedule.get("timezone")) or "UTC"
        cooldown = as_float(as_dict(spec.get("promotion")).get("cooldown_seconds")) or 0.0
        last_promotion = _aware(repo.last_promotion_at(session, pipeline.name))
        cooling = last_promotion + timedelta(seconds=cooldown) if last_promotion and cooldown else None
        frozen_until = _aware(pipeline.frozen_until)
        active = repo.active_rollout(session, pipeline.name)
        cards.append(
            PipelineCard(
                name=pipeline.name,
                dataset=pipeline.dataset,
                champion_version=version_of(pipeline.champion_version_id),
                frozen_until=frozen_until,
                frozen=frozen_until is not None and frozen_until > now,
                cooldown_seconds=cooldown,
                cooling_down_until=cooling if cooling is not None and cooling > now else None,
                schedule=f"{cron} ({timezone})" if cron else None,
                next_run=_next_run(cron, timezone, now) if cron else None,
                runs=tuple(_run_row(r, version_of) for r in repo.list_runs(session, pipeline.name, limit=RECENT_RUNS)),
                rollout=collect_rollout(active, version_of) if active is not None else None,
            )
        )
    return tuple(cards), len(pipelines)


def _training(evidence: dict[str, object], val_metric: str) -> tuple[EpochPoint, ...]:
    history = as_dict(evidence.get("training")).get("history")
    epochs = [as_dict(epoch) for epoch in history] if isinstance(history, list) else []
    return tuple(
        EpochPoint(
            epoch=int(as_float(epoch.get("epoch")) or number),
            train_loss=as_float(epoch.get("train_loss")),
            val_loss=as_float(epoch.get("val_loss")),
            val_metric=as_float(epoch.get(f"val_{val_metric}")),
        )
        for number, epoch in enumerate(epochs, 1)
    )


def run_page(session: Session, run_id: str) -> RunPage:
    """One run's decision record; NotFoundError for an unknown run."""
    run = repo.get_run(session, run_id)
    pipeline = repo.get_pipeline(session, run.pipeline)
    version_of = _VersionsOnDemand(session)
    rollout = next(
        (r for r in repo.list_rollouts(session, pipeline.name, ROLLOUTS_SEARCHED) if r.run_id == run.id), None
    )
    report = collect_run_report(session, run, rollout, task_named(pipeline.spec.get("task")))
    dataset = repo.get_dataset_version(session, run.dataset_version_id) if run.dataset_version_id else None
    val_metric = HEADLINE_METRIC[report.task]
    return RunPage(
        pipeline=pipeline.name,
        run=report,
        events=tuple(EventRow(v.event_id, v.source, v.type, v.received_at) for v in repo.run_events(session, run.id)),
        dataset_sha256=dataset.sha256 if dataset else None,
        dataset_rows=dataset.rows if dataset else None,
        val_metric=val_metric,
        training=_training(run.evidence or {}, val_metric),
        rollout=collect_rollout(rollout, version_of) if rollout is not None else None,
        alias_moves=tuple(alias_move_report(m, version_of) for m in repo.alias_moves_of_run(session, run.id)),
        prefect_flow_run_id=run.prefect_flow_run_id,
    )


def models_page(session: Session, name: str) -> ModelsPage:
    """A pipeline's model versions and its champion's alias history; NotFoundError for an unknown one."""
    pipeline = repo.get_pipeline(session, name)
    headline = HEADLINE_METRIC[task_named(pipeline.spec.get("task"))]
    versions = repo.list_model_versions(session, name, limit=MODELS_SHOWN)
    version_of = _VersionsOnDemand(session, {v.id: v.version for v in versions})
    return ModelsPage(
        pipeline=name,
        headline_metric=headline,
        champion_version=version_of(pipeline.champion_version_id),
        versions=tuple((v, as_float(v.metrics.get(headline))) for v in versions),  # newest first
        alias_moves=tuple(
            alias_move_report(m, version_of) for m in repo.alias_history(session, name, limit=MODELS_SHOWN)
        ),
        shown=MODELS_SHOWN,
    )


def latest_rollout(session: Session, name: str) -> RolloutReport | None:
    """The pipeline's current or last rollout (None: never had one); NotFoundError for an unknown pipeline."""
    repo.get_pipeline(session, name)
    rollout = repo.latest_rollout(session, name)
    return collect_rollout(rollout, _VersionsOnDemand(session)) if rollout is not None else None
