"""Repository functions over the metadata schema.

Each takes a Session, never commits, and returns domain entities: the caller owns the
transaction (`storage.db.transaction`). Uniqueness that matters for correctness (one inbox row
per event id, one run per idempotency key or debounce window, one active rollout, the champion
alias) is decided by the database, never by process memory, so it holds across processes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain import apikeys
from domain import entities as e
from domain.errors import ConflictError, InvalidInputError, NotFoundError
from storage.orm import (
    SqlAliasMove,
    SqlApiKey,
    SqlDatasetVersion,
    SqlEvent,
    SqlGateDecision,
    SqlModelVersion,
    SqlPipeline,
    SqlRollout,
    SqlRolloutStep,
    SqlRun,
    SqlRunEvent,
    utcnow,
)

CHAMPION_ALIAS = "champion"


def spec_digest(spec: dict[str, Any]) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------ pipelines


def _pipeline_row(session: Session, name: str, *, for_update: bool = False) -> SqlPipeline:
    query = select(SqlPipeline).where(SqlPipeline.name == name)
    if for_update:
        query = query.with_for_update()
    row = session.scalars(query).one_or_none()
    if row is None:
        known = ", ".join(session.scalars(select(SqlPipeline.name).order_by(SqlPipeline.name))) or "none"
        raise NotFoundError(f"pipeline {name!r} not found (known pipelines: {known})")
    return row


def upsert_pipeline(session: Session, name: str, dataset: str, spec: dict[str, Any]) -> e.Pipeline:
    """Registers a pipeline or updates its spec; the champion alias is never touched here."""
    row = session.scalars(select(SqlPipeline).where(SqlPipeline.name == name)).one_or_none()
    if row is None:
        row = SqlPipeline(name=name, dataset=dataset, spec=spec, spec_sha256=spec_digest(spec))
        session.add(row)
    else:
        row.dataset, row.spec, row.spec_sha256 = dataset, spec, spec_digest(spec)
    session.flush()
    return row.to_entity()


def get_pipeline(session: Session, name: str) -> e.Pipeline:
    return _pipeline_row(session, name).to_entity()


def list_pipelines(session: Session) -> list[e.Pipeline]:
    return [row.to_entity() for row in session.scalars(select(SqlPipeline).order_by(SqlPipeline.name))]


def pipelines_for_dataset(session: Session, dataset: str) -> list[e.Pipeline]:
    query = select(SqlPipeline).where(SqlPipeline.dataset == dataset).order_by(SqlPipeline.name)
    return [row.to_entity() for row in session.scalars(query)]


def set_freeze(session: Session, name: str, until: datetime | None) -> e.Pipeline:
    row = _pipeline_row(session, name)
    row.frozen_until = until
    session.flush()
    return row.to_entity()


# ------------------------------------------------------------------------------------- datasets


def record_dataset_version(
    session: Session, dataset: str, version: str, uri: str, *, rows: int | None = None, sha256: str | None = None
) -> e.DatasetVersion:
    """Idempotent: the same (dataset, version, uri) again returns the stored row; another uri for
    an existing version is a conflict (a version names one immutable piece of data)."""
    query = select(SqlDatasetVersion).where(SqlDatasetVersion.dataset == dataset, SqlDatasetVersion.version == version)
    existing = session.scalars(query).one_or_none()
    if existing is None:
        try:
            with session.begin_nested():
                existing = SqlDatasetVersion(dataset=dataset, version=version, uri=uri, rows=rows, sha256=sha256)
                session.add(existing)
        except IntegrityError:
            existing = session.scalars(query).one()
    if existing.uri != uri:
        raise ConflictError(
            f"dataset {dataset!r} version {version!r} is already recorded with uri {existing.uri!r}, "
            f"not {uri!r}; publish the new data under a new version"
        )
    return existing.to_entity()


def latest_dataset_version(session: Session, dataset: str) -> e.DatasetVersion | None:
    query = (
        select(SqlDatasetVersion)
        .where(SqlDatasetVersion.dataset == dataset)
        .order_by(SqlDatasetVersion.created_at.desc(), SqlDatasetVersion.id.desc())
        .limit(1)
    )
    row = session.scalars(query).one_or_none()
    return row.to_entity() if row else None


# ---------------------------------------------------------------------------------------- inbox


def add_to_inbox(
    session: Session,
    *,
    event_id: str,
    source: str,
    type: str,
    dataset: str,
    payload: dict[str, Any],
    subject: str | None = None,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
) -> tuple[e.InboxEvent, bool]:
    """Stores an event once per id. Returns (event, created); a redelivery returns created=False
    and the first delivery's row, so the same id has the effect of once."""
    query = select(SqlEvent).where(SqlEvent.event_id == event_id)
    existing = session.scalars(query).one_or_none()
    if existing is not None:
        return existing.to_entity(), False
    try:
        with session.begin_nested():
            row = SqlEvent(
                event_id=event_id,
                source=source,
                type=type,
                subject=subject,
                dataset=dataset,
                topic=topic,
                partition=partition,
                offset=offset,
                payload=payload,
                status=e.EventStatus.RECEIVED.value,
            )
            session.add(row)
    except IntegrityError:  # another consumer stored it between our SELECT and INSERT
        return session.scalars(query).one().to_entity(), False
    return row.to_entity(), True


def get_event(session: Session, event_id: str) -> e.InboxEvent:
    row = session.scalars(select(SqlEvent).where(SqlEvent.event_id == event_id)).one_or_none()
    if row is None:
        raise NotFoundError(f"event {event_id!r} not found in the inbox")
    return row.to_entity()


def pending_events(session: Session, dataset: str) -> list[e.InboxEvent]:
    query = (
        select(SqlEvent)
        .where(SqlEvent.dataset == dataset, SqlEvent.status == e.EventStatus.RECEIVED.value)
        .order_by(SqlEvent.id)
    )
    return [row.to_entity() for row in session.scalars(query)]


def set_event_status(session: Session, event_ids: Iterable[str], status: e.EventStatus) -> int:
    ids = list(event_ids)
    if not ids:
        return 0
    result = session.execute(update(SqlEvent).where(SqlEvent.event_id.in_(ids)).values(status=status.value))
    return int(result.rowcount)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------- runs


def new_run_id() -> str:
    return str(uuid.uuid4())


def _run_row(session: Session, run_id: str) -> SqlRun:
    row = session.get(SqlRun, run_id)
    if row is None:
        raise NotFoundError(f"run {run_id!r} not found")
    return row


def create_run(
    session: Session,
    pipeline: str,
    trigger_kind: e.TriggerKind,
    *,
    reason: str | None = None,
    idempotency_key: str | None = None,
    request_sha256: str | None = None,
    dedupe_key: str | None = None,
    event_ids: Sequence[str] = (),
    run_id: str | None = None,
) -> tuple[e.Run, bool]:
    """Creates a queued run, idempotently. Returns (run, created).

    - the same `idempotency_key` with the same `request_sha256` returns the first run;
      with another request it raises ConflictError (code `conflict`; the API answers 422);
    - the same (pipeline, `dedupe_key`) returns the existing run (one run per debounce window).
    """
    pipeline_row = _pipeline_row(session, pipeline)
    existing = _existing_run(session, pipeline_row.id, idempotency_key, request_sha256, dedupe_key)
    if existing is not None:
        return existing.to_entity(), False
    row = SqlRun(
        id=run_id or new_run_id(),
        pipeline_id=pipeline_row.id,
        trigger_kind=trigger_kind.value,
        status=e.RunStatus.QUEUED.value,
        reason=reason,
        idempotency_key=idempotency_key,
        request_sha256=request_sha256,
        dedupe_key=dedupe_key,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # a concurrent request won the race: theirs is the run
        existing = _existing_run(session, pipeline_row.id, idempotency_key, request_sha256, dedupe_key)
        if existing is None:
            raise
        return existing.to_entity(), False
    if event_ids:
        link_events(session, row.id, event_ids)
    session.flush()
    session.refresh(row)
    return row.to_entity(), True


def _existing_run(
    session: Session,
    pipeline_id: int,
    idempotency_key: str | None,
    request_sha256: str | None,
    dedupe_key: str | None,
) -> SqlRun | None:
    if idempotency_key is not None:
        row = session.scalars(select(SqlRun).where(SqlRun.idempotency_key == idempotency_key)).one_or_none()
        if row is not None:
            if row.request_sha256 != request_sha256 or row.pipeline_id != pipeline_id:
                raise ConflictError(
                    f"Idempotency-Key {idempotency_key!r} was already used for a different request "
                    f"(run {row.id}); use a new key for a new request"
                )
            return row
    if dedupe_key is not None:
        query = select(SqlRun).where(SqlRun.pipeline_id == pipeline_id, SqlRun.dedupe_key == dedupe_key)
        return session.scalars(query).one_or_none()
    return None


def link_events(session: Session, run_id: str, event_ids: Sequence[str]) -> None:
    """Attaches inbox events to a run (idempotent) and marks them linked."""
    rows = session.scalars(select(SqlEvent).where(SqlEvent.event_id.in_(list(event_ids)))).all()
    missing = set(event_ids) - {row.event_id for row in rows}
    if missing:
        raise NotFoundError(f"events not in the inbox: {', '.join(sorted(missing))}")
    already = set(session.scalars(select(SqlRunEvent.event_pk).where(SqlRunEvent.run_id == run_id)))
    for row in rows:
        if row.id not in already:
            session.add(SqlRunEvent(run_id=run_id, event_pk=row.id))
        row.status = e.EventStatus.LINKED.value
    session.flush()


def get_run(session: Session, run_id: str) -> e.Run:
    return _run_row(session, run_id).to_entity()


def list_runs(session: Session, pipeline: str | None = None, limit: int = 50) -> list[e.Run]:
    if not 1 <= limit <= 1000:
        raise InvalidInputError(f"limit must be between 1 and 1000 (got {limit})")
    query = select(SqlRun).order_by(SqlRun.created_at.desc(), SqlRun.id.desc()).limit(limit)
    if pipeline is not None:
        query = query.where(SqlRun.pipeline_id == _pipeline_row(session, pipeline).id)
    return [row.to_entity() for row in session.scalars(query)]


def update_run(
    session: Session,
    run_id: str,
    *,
    status: e.RunStatus | None = None,
    error: str | None = None,
    prefect_flow_run_id: str | None = None,
    dataset_version_id: int | None = None,
    model_version_id: int | None = None,
    evidence: dict[str, Any] | None = None,
) -> e.Run:
    """Moves a run forward. A final status is never left again (ConflictError)."""
    row = _run_row(session, run_id)
    if status is not None and status.value != row.status:
        current = e.RunStatus(row.status)
        if current.is_final:
            raise ConflictError(f"run {run_id} is already {current.value}; it cannot become {status.value}")
        row.status = status.value
        now = utcnow()
        if status is e.RunStatus.RUNNING and row.started_at is None:
            row.started_at = now
        if status.is_final:
            row.finished_at = now
    if error is not None:
        row.error = error
    if prefect_flow_run_id is not None:
        row.prefect_flow_run_id = prefect_flow_run_id
    if dataset_version_id is not None:
        row.dataset_version_id = dataset_version_id
    if model_version_id is not None:
        row.model_version_id = model_version_id
    if evidence is not None:
        row.evidence = {**(row.evidence or {}), **evidence}
    session.flush()
    return row.to_entity()


# ------------------------------------------------------------------------------- model versions


def register_model_version(
    session: Session,
    pipeline: str,
    *,
    artifact_uri: str,
    sha256: str,
    size_bytes: int,
    metrics: dict[str, Any],
    run_id: str | None = None,
    stage: e.ModelStage = e.ModelStage.CANDIDATE,
    manifest: dict[str, Any] | None = None,
) -> e.ModelVersion:
    """Adds the next version number of a pipeline's model. The unique (pipeline, version)
    constraint makes concurrent registrations take distinct numbers (the loser retries)."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise InvalidInputError(f"sha256 must be 64 lowercase hex digits (got {sha256!r})")
    pipeline_row = _pipeline_row(session, pipeline)
    for _attempt in range(5):
        current_max = session.scalar(
            select(func.max(SqlModelVersion.version)).where(SqlModelVersion.pipeline_id == pipeline_row.id)
        )
        row = SqlModelVersion(
            pipeline_id=pipeline_row.id,
            version=(current_max or 0) + 1,
            run_id=run_id,
            artifact_uri=artifact_uri,
            sha256=sha256,
            size_bytes=size_bytes,
            metrics=metrics,
            manifest=manifest,
            stage=stage.value,
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            continue
        return row.to_entity()
    raise ConflictError(f"could not allocate a version number for pipeline {pipeline!r}; retry")


def _model_row(session: Session, version_id: int) -> SqlModelVersion:
    row = session.get(SqlModelVersion, version_id)
    if row is None:
        raise NotFoundError(f"model version id {version_id} not found")
    return row


def get_model_version(session: Session, pipeline: str, version: int) -> e.ModelVersion:
    pipeline_row = _pipeline_row(session, pipeline)
    query = select(SqlModelVersion).where(
        SqlModelVersion.pipeline_id == pipeline_row.id, SqlModelVersion.version == version
    )
    row = session.scalars(query).one_or_none()
    if row is None:
        raise NotFoundError(f"pipeline {pipeline!r} has no model version {version}")
    return row.to_entity()


def get_model_version_by_id(session: Session, version_id: int) -> e.ModelVersion:
    return _model_row(session, version_id).to_entity()


def list_model_versions(session: Session, pipeline: str) -> list[e.ModelVersion]:
    pipeline_row = _pipeline_row(session, pipeline)
    query = (
        select(SqlModelVersion)
        .where(SqlModelVersion.pipeline_id == pipeline_row.id)
        .order_by(SqlModelVersion.version.desc())
    )
    return [row.to_entity() for row in session.scalars(query)]


def set_model_stage(session: Session, version_id: int, stage: e.ModelStage) -> e.ModelVersion:
    if stage is e.ModelStage.CHAMPION:
        raise InvalidInputError("a version becomes champion only through move_champion (it writes alias_history)")
    row = _model_row(session, version_id)
    row.stage, row.stage_changed_at = stage.value, utcnow()
    session.flush()
    return row.to_entity()


def get_champion(session: Session, pipeline: str) -> e.ModelVersion | None:
    pipeline_row = _pipeline_row(session, pipeline)
    if pipeline_row.champion_version_id is None:
        return None
    return _model_row(session, pipeline_row.champion_version_id).to_entity()


def move_champion(
    session: Session,
    pipeline: str,
    to_version_id: int | None,
    *,
    expected_from_version_id: int | None,
    actor: str,
    reason: str,
    run_id: str | None = None,
    previous_stage: e.ModelStage = e.ModelStage.RETIRED,
) -> e.AliasMove:
    """Moves the champion alias as a compare-and-set: it succeeds only if the champion is still
    `expected_from_version_id`, so two workers can never both promote. Writes alias_history,
    gives the old champion `previous_stage` (retired, or rolled_back for a rollback) and stages
    the new one, all in the caller's transaction."""
    if not reason.strip():
        raise InvalidInputError("moving the champion alias needs a reason")
    pipeline_row = _pipeline_row(session, pipeline)
    if to_version_id is not None:
        target = _model_row(session, to_version_id)
        if target.pipeline_id != pipeline_row.id:
            raise InvalidInputError(f"model version id {to_version_id} belongs to another pipeline, not {pipeline!r}")
    result = session.execute(
        update(SqlPipeline)
        .where(
            SqlPipeline.id == pipeline_row.id,
            SqlPipeline.champion_version_id.is_(None)
            if expected_from_version_id is None
            else SqlPipeline.champion_version_id == expected_from_version_id,
        )
        .values(champion_version_id=to_version_id, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.refresh(pipeline_row)
        raise ConflictError(
            f"champion of {pipeline!r} moved concurrently: expected version id {expected_from_version_id}, "
            f"found {pipeline_row.champion_version_id}; re-read and decide again"
        )
    now = utcnow()
    if expected_from_version_id is not None and expected_from_version_id != to_version_id:
        old = _model_row(session, expected_from_version_id)
        old.stage, old.stage_changed_at = previous_stage.value, now
    if to_version_id is not None:
        new = _model_row(session, to_version_id)
        new.stage, new.stage_changed_at = e.ModelStage.CHAMPION.value, now
    move = SqlAliasMove(
        pipeline_id=pipeline_row.id,
        alias=CHAMPION_ALIAS,
        from_version_id=expected_from_version_id,
        to_version_id=to_version_id,
        run_id=run_id,
        actor=actor,
        reason=reason,
    )
    session.add(move)
    session.flush()
    session.refresh(pipeline_row)
    return move.to_entity()


def alias_history(session: Session, pipeline: str) -> list[e.AliasMove]:
    pipeline_row = _pipeline_row(session, pipeline)
    query = (
        select(SqlAliasMove)
        .where(SqlAliasMove.pipeline_id == pipeline_row.id)
        .order_by(SqlAliasMove.moved_at.desc(), SqlAliasMove.id.desc())
    )
    return [row.to_entity() for row in session.scalars(query)]


# ----------------------------------------------------------------------------- gate decisions


def record_gate_checks(
    session: Session, run_id: str, checks: Sequence[e.GateCheck], *, model_version_id: int | None = None
) -> list[e.GateVerdict]:
    _run_row(session, run_id)
    rows = [
        SqlGateDecision(
            run_id=run_id,
            model_version_id=model_version_id,
            metric=check.metric,
            check=check.check,
            verdict=check.verdict.value,
            candidate_value=check.candidate_value,
            champion_value=check.champion_value,
            threshold=check.threshold,
            ci_low=check.ci_low,
            ci_high=check.ci_high,
            reason=check.reason,
        )
        for check in checks
    ]
    session.add_all(rows)
    session.flush()
    return [row.to_entity() for row in rows]


def gate_verdicts(session: Session, run_id: str) -> list[e.GateVerdict]:
    query = select(SqlGateDecision).where(SqlGateDecision.run_id == run_id).order_by(SqlGateDecision.id)
    return [row.to_entity() for row in session.scalars(query)]


# ------------------------------------------------------------------------------------- rollouts


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
    pipeline_row = _pipeline_row(session, pipeline)
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
    return row.to_entity()


def active_rollout(session: Session, pipeline: str) -> e.Rollout | None:
    pipeline_row = _pipeline_row(session, pipeline)
    query = select(SqlRollout).where(
        SqlRollout.pipeline_id == pipeline_row.id, SqlRollout.status == e.RolloutStatus.ACTIVE.value
    )
    row = session.scalars(query).one_or_none()
    return row.to_entity() if row else None


def latest_rollout(session: Session, pipeline: str) -> e.Rollout | None:
    pipeline_row = _pipeline_row(session, pipeline)
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
    pipeline_row = _pipeline_row(session, pipeline)
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
    analysis: dict[str, Any],
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
        analysis=analysis,
        finished_at=utcnow() if finished else None,
    )
    try:
        with session.begin_nested():
            session.add(step)
    except IntegrityError as err:
        raise ConflictError(f"rollout {rollout_id} step {step_index} is already recorded") from err
    rollout.current_step = max(rollout.current_step, step_index + 1)
    session.flush()
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
            analysis={"attempts": []},
        )
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
    attempt: dict[str, Any],
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
    attempts = [*step.analysis.get("attempts", []), attempt]
    step.analysis = {"attempts": attempts, "action": attempt.get("action"), "reason": attempt.get("reason")}
    if verdict is None:
        step.started_at = utcnow()
    else:
        step.verdict, step.finished_at = verdict.value, utcnow()
        if next_step is not None:
            rollout.current_step = next_step
    session.flush()
    session.refresh(step)
    return step.to_entity()


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
        open_step.analysis = {**open_step.analysis, "action": status.value, "reason": reason}
    session.flush()
    session.refresh(row)
    return row.to_entity()


# ------------------------------------------------------------------------------------- api keys


def create_api_key(session: Session, name: str) -> tuple[e.ApiKey, str]:
    """Returns (key, plaintext). The plaintext is shown once; only its sha256 is stored."""
    if not name.strip():
        raise InvalidInputError("an API key needs a name, e.g. `retrainer apikey create ci-bot`")
    if session.scalars(select(SqlApiKey).where(SqlApiKey.name == name)).one_or_none() is not None:
        raise ConflictError(f"an API key named {name!r} already exists; pick another name")
    material = apikeys.generate_api_key()
    row = SqlApiKey(name=name, prefix=material.prefix, key_sha256=material.sha256)
    session.add(row)
    session.flush()
    return row.to_entity(), material.plaintext


def authenticate_api_key(session: Session, presented: str) -> e.ApiKey | None:
    """The key's entity if `presented` is a valid, unrevoked key; None otherwise."""
    try:
        prefix = apikeys.prefix_of(presented)
    except InvalidInputError:
        return None
    row = session.scalars(select(SqlApiKey).where(SqlApiKey.prefix == prefix)).one_or_none()
    if row is None or row.revoked_at is not None or not apikeys.key_matches(presented, row.key_sha256):
        return None
    row.last_used_at = utcnow()
    session.flush()
    return row.to_entity()


def revoke_api_key(session: Session, name: str) -> e.ApiKey:
    row = session.scalars(select(SqlApiKey).where(SqlApiKey.name == name)).one_or_none()
    if row is None:
        raise NotFoundError(f"no API key named {name!r}")
    row.revoked_at = row.revoked_at or utcnow()
    session.flush()
    return row.to_entity()


def set_dataset_sha256(session: Session, dataset_version_id: int, sha256: str) -> e.DatasetVersion:
    """Records the digest of a version's bytes the first time they are fetched; a different digest
    later is a conflict (the version's data changed under its name)."""
    row = session.get(SqlDatasetVersion, dataset_version_id)
    if row is None:
        raise NotFoundError(f"dataset version id {dataset_version_id} not found")
    if row.sha256 is not None and row.sha256 != sha256:
        raise ConflictError(
            f"dataset {row.dataset!r} version {row.version!r} was recorded with sha256 {row.sha256}, now {sha256}"
        )
    row.sha256 = sha256
    session.flush()
    return row.to_entity()


def get_dataset_version(session: Session, dataset_version_id: int) -> e.DatasetVersion:
    row = session.get(SqlDatasetVersion, dataset_version_id)
    if row is None:
        raise NotFoundError(f"dataset version id {dataset_version_id} not found")
    return row.to_entity()


def last_promotion_at(session: Session, pipeline: str) -> datetime | None:
    pipeline_row = _pipeline_row(session, pipeline)
    return session.scalar(select(func.max(SqlAliasMove.moved_at)).where(SqlAliasMove.pipeline_id == pipeline_row.id))


def decision_record(session: Session, run_id: str) -> dict[str, Any]:
    """The whole chain for one run, JSON-safe: trigger and events → dataset version → candidate
    metrics → champion metrics on the same data → gate verdicts → quantization → outcome and
    alias moves. `retrainer runs show` prints it; the API serves it at GET /api/v1/runs/{id}."""
    run = _run_row(session, run_id)
    entity = run.to_entity()
    evidence = dict(run.evidence or {})
    version = session.get(SqlModelVersion, run.model_version_id) if run.model_version_id else None
    dataset = session.get(SqlDatasetVersion, run.dataset_version_id) if run.dataset_version_id else None
    moves = session.scalars(select(SqlAliasMove).where(SqlAliasMove.run_id == run_id).order_by(SqlAliasMove.id))
    return {
        "run_id": entity.id,
        "pipeline": entity.pipeline,
        "status": entity.status.value,
        "trigger": {
            "kind": entity.trigger_kind.value,
            "event_ids": list(entity.event_ids),
            "reason": entity.reason,
            "events": [
                {
                    "id": ev.event_id,
                    "source": ev.source,
                    "type": ev.type,
                    "topic": ev.topic,
                    "partition": ev.partition,
                    "offset": ev.offset,
                    "received_at": ev.received_at.isoformat(),
                }
                for ev in run.events
            ],
        },
        "model_version": version.version if version else None,
        "decision": {
            "dataset": None
            if dataset is None
            else {
                "dataset": dataset.dataset,
                "version": dataset.version,
                "uri": dataset.uri,
                "rows": dataset.rows,
                "sha256": dataset.sha256,
            },
            "data_split": evidence.get("data_split"),
            "training": evidence.get("training"),
            "candidate": evidence.get("candidate"),
            "champion": evidence.get("champion"),
            "comparisons": evidence.get("comparisons"),
            "quantization": evidence.get("quantization"),
            "gate": [
                {
                    "metric": v.metric,
                    "check": v.check,
                    "verdict": v.verdict.value,
                    "candidate": v.candidate_value,
                    "champion": v.champion_value,
                    "threshold": v.threshold,
                    "ci_low": v.ci_low,
                    "ci_high": v.ci_high,
                    "reason": v.reason,
                }
                for v in gate_verdicts(session, run_id)
            ],
            "outcome": evidence.get("outcome"),
            "alias_moves": [
                {
                    "from_version_id": m.from_version_id,
                    "to_version_id": m.to_version_id,
                    "actor": m.actor,
                    "reason": m.reason,
                    "moved_at": m.moved_at.isoformat(),
                }
                for m in moves
            ],
        },
        "error": entity.error,
        "prefect_flow_run_id": entity.prefect_flow_run_id,
        "created_at": entity.created_at.isoformat(),
        "started_at": entity.started_at.isoformat() if entity.started_at else None,
        "finished_at": entity.finished_at.isoformat() if entity.finished_at else None,
    }


SUBMITTING = "submitting"


def claim_submission(session: Session, run_id: str) -> bool:
    """Compare-and-set: only one caller gets to submit a queued run's flow run (the others see
    it claimed). Released with `release_submission` if the submission fails."""
    result = session.execute(
        update(SqlRun)
        .where(SqlRun.id == run_id, SqlRun.prefect_flow_run_id.is_(None), SqlRun.status == e.RunStatus.QUEUED.value)
        .values(prefect_flow_run_id=SUBMITTING)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def unsubmitted_runs(session: Session, limit: int = 100) -> list[e.Run]:
    """Queued runs that no flow run was submitted for (a submission failed, e.g. Prefect was down)."""
    query = (
        select(SqlRun)
        .where(SqlRun.status == e.RunStatus.QUEUED.value, SqlRun.prefect_flow_run_id.is_(None))
        .order_by(SqlRun.created_at)
        .limit(limit)
    )
    return [row.to_entity() for row in session.scalars(query)]


def release_submission(session: Session, run_id: str) -> None:
    session.execute(
        update(SqlRun)
        .where(SqlRun.id == run_id, SqlRun.prefect_flow_run_id == SUBMITTING)
        .values(prefect_flow_run_id=None)
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True, slots=True)
class NewInboxEvent:
    event_id: str
    source: str
    type: str
    dataset: str
    payload: dict[str, Any]
    subject: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


def add_many_to_inbox(session: Session, events: Sequence[NewInboxEvent]) -> tuple[int, int]:
    """Stores a batch of events, each id once: (stored, duplicates). One query finds the ids
    already present and one multi-row insert stores the rest; if a concurrent consumer inserted
    some of them in between, the batch falls back to the row-by-row path, which resolves it."""
    if not events:
        return 0, 0
    ids = [event.event_id for event in events]
    present = set(session.scalars(select(SqlEvent.event_id).where(SqlEvent.event_id.in_(ids))))
    fresh: dict[str, NewInboxEvent] = {}
    for event in events:
        if event.event_id not in present and event.event_id not in fresh:
            fresh[event.event_id] = event
    if fresh:
        try:
            with session.begin_nested():
                session.execute(
                    insert(SqlEvent),
                    [
                        {
                            "event_id": ev.event_id,
                            "source": ev.source,
                            "type": ev.type,
                            "subject": ev.subject,
                            "dataset": ev.dataset,
                            "topic": ev.topic,
                            "partition": ev.partition,
                            "offset": ev.offset,
                            "payload": ev.payload,
                            "status": e.EventStatus.RECEIVED.value,
                            "received_at": utcnow(),
                        }
                        for ev in fresh.values()
                    ],
                )
        except IntegrityError:
            stored = sum(
                add_to_inbox(
                    session,
                    event_id=ev.event_id,
                    source=ev.source,
                    type=ev.type,
                    dataset=ev.dataset,
                    payload=ev.payload,
                    subject=ev.subject,
                    topic=ev.topic,
                    partition=ev.partition,
                    offset=ev.offset,
                )[1]
                for ev in fresh.values()
            )
            return stored, len(events) - stored
    return len(fresh), len(events) - len(fresh)
