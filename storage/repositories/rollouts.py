"""Canary rollouts and their steps: one active rollout per pipeline, each step analysed once."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain import entities as e
from domain.decisions import rollout_finished_event, rollout_step_event
from domain.errors import ConflictError, InvalidInputError, NotFoundError
from domain.evidence import CanaryAttempt, StepAnalysis
from storage.notify import SERVING_CHANNEL, notify
from storage.orm import SqlRollout, SqlRolloutStep, utcnow
from storage.repositories.outbox import record_decision
from storage.repositories.pipelines import find_pipeline_row


def start_rollout(
    session: Session,
    pipeline: str,
    *,
    candidate_version_id: int,
    champion_version_id: int | None,
    policy: dict[str, Any],
    run_id: str | None = None,
) -> e.Rollout:
    """Opens the pipeline's rollout; a second active one is refused by the database."""
    pipeline_row = find_pipeline_row(session, pipeline)
    row = SqlRollout(
        pipeline_id=pipeline_row.id,
        run_id=run_id,
        candidate_version_id=candidate_version_id,
        champion_version_id=champion_version_id,
        status=e.RolloutStatus.ACTIVE.value,
        current_step=0,
        policy=policy,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError as err:
        active = active_rollout(session, pipeline)
        raise ConflictError(
            f"pipeline {pipeline!r} already has an active rollout (id {active.id if active else '?'}); "
            "finish or abort it first"
        ) from err
    session.refresh(row)
    notify(session, SERVING_CHANNEL, pipeline)  # the model servers load the canary at once
    return row.to_entity()


def active_rollout(session: Session, pipeline: str) -> e.Rollout | None:
    pipeline_row = find_pipeline_row(session, pipeline)
    query = select(SqlRollout).where(
        SqlRollout.pipeline_id == pipeline_row.id, SqlRollout.status == e.RolloutStatus.ACTIVE.value
    )
    row = session.scalars(query).one_or_none()
    return row.to_entity() if row else None


def latest_rollout(session: Session, pipeline: str) -> e.Rollout | None:
    pipeline_row = find_pipeline_row(session, pipeline)
    query = (
        select(SqlRollout)
        .where(SqlRollout.pipeline_id == pipeline_row.id)
        .order_by(SqlRollout.started_at.desc(), SqlRollout.id.desc())
        .limit(1)
    )
    row = session.scalars(query).one_or_none()
    return row.to_entity() if row else None


def list_rollouts(session: Session, pipeline: str, limit: int = 50) -> list[e.Rollout]:
    """The pipeline's rollouts, newest first, each with its steps."""
    pipeline_row = find_pipeline_row(session, pipeline)
    query = (
        select(SqlRollout)
        .where(SqlRollout.pipeline_id == pipeline_row.id)
        .order_by(SqlRollout.started_at.desc(), SqlRollout.id.desc())
        .limit(limit)
    )
    return [row.to_entity() for row in session.scalars(query)]


def record_rollout_step(
    session: Session,
    rollout_id: int,
    *,
    step_index: int,
    traffic_percent: float,
    verdict: e.Verdict | None,
    analysis: StepAnalysis | None = None,
    finished: bool = True,
) -> e.RolloutStep:
    """Stores one analysed step and advances the rollout; a step is never recorded twice."""
    rollout = session.get(SqlRollout, rollout_id)
    if rollout is None:
        raise NotFoundError(f"rollout {rollout_id} not found")
    if rollout.status != e.RolloutStatus.ACTIVE.value:
        raise ConflictError(f"rollout {rollout_id} is {rollout.status}; no more steps can be recorded")
    step = SqlRolloutStep(
        rollout_id=rollout_id,
        step_index=step_index,
        traffic_percent=traffic_percent,
        verdict=verdict.value if verdict else None,
        finished_at=utcnow() if finished else None,
    )
    step.store_analysis(analysis or StepAnalysis())
    try:
        with session.begin_nested():
            session.add(step)
    except IntegrityError as err:
        raise ConflictError(f"rollout {rollout_id} step {step_index} is already recorded") from err
    rollout.current_step = max(rollout.current_step, step_index + 1)
    session.flush()
    notify(session, SERVING_CHANNEL, rollout.pipeline.name)  # the canary's weight moved
    return step.to_entity()


def _active_rollout_row(session: Session, rollout_id: int) -> SqlRollout:
    # FOR UPDATE OF rollouts only: PostgreSQL refuses to lock the outer-joined pipeline row
    rollout = session.get(SqlRollout, rollout_id, with_for_update={"of": SqlRollout})
    if rollout is None:
        raise NotFoundError(f"rollout {rollout_id} not found")
    if rollout.status != e.RolloutStatus.ACTIVE.value:
        raise ConflictError(f"rollout {rollout_id} is {rollout.status}; it has no step in progress")
    return rollout


def _step_row(session: Session, rollout_id: int, step_index: int) -> SqlRolloutStep | None:
    query = select(SqlRolloutStep).where(
        SqlRolloutStep.rollout_id == rollout_id, SqlRolloutStep.step_index == step_index
    )
    return session.scalars(query).one_or_none()


def begin_rollout_step(session: Session, rollout_id: int, *, traffic_percent: float) -> e.RolloutStep:
    """The rollout's step in progress (`current_step`), opened now if it is not stored yet.

    Its `started_at` is when its analysis window began, so a controller that restarts reads the
    same step and the same window back: no step is skipped or run twice."""
    rollout = _active_rollout_row(session, rollout_id)
    step = _step_row(session, rollout_id, rollout.current_step)
    if step is None:
        step = SqlRolloutStep(
            rollout_id=rollout_id,
            step_index=rollout.current_step,
            traffic_percent=traffic_percent,
            verdict=None,
        )
        step.store_analysis(StepAnalysis())
        try:
            with session.begin_nested():
                session.add(step)
        except IntegrityError as err:  # another controller opened it in the meantime
            raise ConflictError(f"rollout {rollout_id} step {rollout.current_step} was opened concurrently") from err
    elif step.finished_at is not None:
        raise ConflictError(f"rollout {rollout_id} step {step.step_index} is already finished")
    return step.to_entity()


def record_step_attempt(
    session: Session,
    rollout_id: int,
    step_index: int,
    attempt: CanaryAttempt,
    *,
    verdict: e.Verdict | None = None,
    next_step: int | None = None,
) -> e.RolloutStep:
    """Stores one analysed window of the step in progress.

    Without a verdict the step stays open and its window restarts now (a failed check below the
    failure limit: the step is analysed again on fresh traffic). With a verdict the step is
    finished; `next_step` (if given) becomes the rollout's step in progress, in the same
    transaction, so the rollout never points at a step whose predecessor is unfinished."""
    rollout = _active_rollout_row(session, rollout_id)
    step = _step_row(session, rollout_id, step_index)
    if step is None or step.finished_at is not None or rollout.current_step != step_index:
        raise ConflictError(f"rollout {rollout_id} step {step_index} is not the step in progress")
    analysis = step.typed_analysis()
    step.store_analysis(
        analysis.model_copy(
            update={"attempts": (*analysis.attempts, attempt), "action": attempt.action, "reason": attempt.reason}
        )
    )
    if verdict is None:
        step.started_at = utcnow()
    else:
        step.verdict, step.finished_at = verdict.value, utcnow()
        if next_step is not None:
            rollout.current_step = next_step
            notify(session, SERVING_CHANNEL, rollout.pipeline.name)  # the canary's weight moved
    session.flush()
    session.refresh(step)
    decided = step.to_entity()
    if verdict is not None:
        record_decision(session, rollout_step_event(rollout.to_entity(), decided))
    return decided


def finish_rollout(session: Session, rollout_id: int, status: e.RolloutStatus, reason: str) -> e.Rollout:
    if status is e.RolloutStatus.ACTIVE:
        raise InvalidInputError("finish_rollout needs a final status, not active")
    row = session.get(SqlRollout, rollout_id)
    if row is None:
        raise NotFoundError(f"rollout {rollout_id} not found")
    if row.status != e.RolloutStatus.ACTIVE.value:
        raise ConflictError(f"rollout {rollout_id} is already {row.status}")
    row.status, row.reason, row.finished_at = status.value, reason, utcnow()
    open_step = _step_row(session, rollout_id, row.current_step)
    if open_step is not None and open_step.finished_at is None:  # e.g. aborted mid-step: close it, saying why
        open_step.finished_at = row.finished_at
        open_step.store_analysis(open_step.typed_analysis().model_copy(update={"action": status, "reason": reason}))
    session.flush()
    notify(session, SERVING_CHANNEL, row.pipeline.name)  # the canary leaves the model servers
    session.refresh(row)
    finished = row.to_entity()
    record_decision(session, rollout_finished_event(finished))
    return finished
