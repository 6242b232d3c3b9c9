"""Model versions and the champion alias (moved by compare-and-set, with its history)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain import entities as e
from domain.decisions import champion_event
from domain.errors import ConflictError, InvalidInputError, NotFoundError
from storage.notify import SERVING_CHANNEL, notify
from storage.orm import SqlAliasMove, SqlModelVersion, SqlPipeline, utcnow
from storage.repositories.outbox import record_decision
from storage.repositories.pipelines import find_pipeline_row

CHAMPION_ALIAS = "champion"


def register_model_version(
    session: Session,
    pipeline: str,
    *,
    metrics: dict[str, Any],
    artifact_uri: str,
    sha256: str,
    size_bytes: int,
    manifest: dict[str, Any] | None = None,
    run_id: str | None = None,
    stage: e.ModelStage = e.ModelStage.CANDIDATE,
) -> e.ModelVersion:
    """Adds the next version number of a pipeline's model. The unique (pipeline, version)
    constraint makes concurrent registrations take distinct numbers (the loser retries)."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise InvalidInputError(f"sha256 must be 64 lowercase hex digits (got {sha256!r})")
    pipeline_row = find_pipeline_row(session, pipeline)
    artifact = {"artifact_uri": artifact_uri, "sha256": sha256, "size_bytes": size_bytes, "manifest": manifest}
    for _attempt in range(5):
        current_max = session.scalar(
            select(func.max(SqlModelVersion.version)).where(SqlModelVersion.pipeline_id == pipeline_row.id)
        )
        version = (current_max or 0) + 1
        row = SqlModelVersion(
            pipeline_id=pipeline_row.id, version=version, run_id=run_id, stage=stage.value, metrics=metrics, **artifact
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            continue
        return row.to_entity()
    raise ConflictError(f"could not allocate a version number for pipeline {pipeline!r}; retry")


def find_model_row(session: Session, version_id: int) -> SqlModelVersion:
    row = session.get(SqlModelVersion, version_id)
    if row is None:
        raise NotFoundError(f"model version id {version_id} not found")
    return row


def get_model_version(session: Session, pipeline: str, version: int) -> e.ModelVersion:
    pipeline_row = find_pipeline_row(session, pipeline)
    query = select(SqlModelVersion).where(
        SqlModelVersion.pipeline_id == pipeline_row.id, SqlModelVersion.version == version
    )
    row = session.scalars(query).one_or_none()
    if row is None:
        raise NotFoundError(f"pipeline {pipeline!r} has no model version {version}")
    return row.to_entity()


def get_model_version_by_id(session: Session, version_id: int) -> e.ModelVersion:
    return find_model_row(session, version_id).to_entity()


def list_model_versions(session: Session, pipeline: str, *, limit: int | None = None) -> list[e.ModelVersion]:
    """The pipeline's versions, newest first (the newest `limit` if given)."""
    pipeline_row = find_pipeline_row(session, pipeline)
    query = (
        select(SqlModelVersion)
        .where(SqlModelVersion.pipeline_id == pipeline_row.id)
        .order_by(SqlModelVersion.version.desc())
        .limit(limit)
    )
    return [row.to_entity() for row in session.scalars(query)]


def set_model_stage(session: Session, version_id: int, stage: e.ModelStage) -> e.ModelVersion:
    if stage is e.ModelStage.CHAMPION:
        raise InvalidInputError("a version becomes champion only through move_champion (it writes alias_history)")
    row = find_model_row(session, version_id)
    row.stage, row.stage_changed_at = stage.value, utcnow()
    session.flush()
    return row.to_entity()


def get_champion(session: Session, pipeline: str) -> e.ModelVersion | None:
    pipeline_row = find_pipeline_row(session, pipeline)
    if pipeline_row.champion_version_id is None:
        return None
    return find_model_row(session, pipeline_row.champion_version_id).to_entity()


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
    pipeline_row = find_pipeline_row(session, pipeline)
    if to_version_id is not None:
        target = find_model_row(session, to_version_id)
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
        old = find_model_row(session, expected_from_version_id)
        old.stage, old.stage_changed_at = previous_stage.value, now
    if to_version_id is not None:
        new = find_model_row(session, to_version_id)
        new.stage, new.stage_changed_at = e.ModelStage.CHAMPION.value, now
    versions = {"from_version_id": expected_from_version_id, "to_version_id": to_version_id}
    move = SqlAliasMove(
        pipeline_id=pipeline_row.id, alias=CHAMPION_ALIAS, run_id=run_id, actor=actor, reason=reason, **versions
    )
    session.add(move)
    session.flush()
    session.refresh(pipeline_row)
    notify(session, SERVING_CHANNEL, pipeline)  # the model servers load the new champion at once
    moved = move.to_entity()
    record_decision(session, champion_event(moved, rolled_back=previous_stage is e.ModelStage.ROLLED_BACK))
    return moved


def alias_history(session: Session, pipeline: str, *, limit: int | None = None) -> list[e.AliasMove]:
    """The pipeline's alias moves, newest first (the newest `limit` if given)."""
    pipeline_row = find_pipeline_row(session, pipeline)
    query = (
        select(SqlAliasMove)
        .where(SqlAliasMove.pipeline_id == pipeline_row.id)
        .order_by(SqlAliasMove.moved_at.desc(), SqlAliasMove.id.desc())
        .limit(limit)
    )
    return [row.to_entity() for row in session.scalars(query)]


def last_promotion_at(session: Session, pipeline: str) -> datetime | None:
    pipeline_row = find_pipeline_row(session, pipeline)
    return session.scalar(select(func.max(SqlAliasMove.moved_at)).where(SqlAliasMove.pipeline_id == pipeline_row.id))


def alias_moves_of_run(session: Session, run_id: str) -> list[e.AliasMove]:
    """The alias moves a run caused (its promotion, or a rollback it triggered), oldest first."""
    query = select(SqlAliasMove).where(SqlAliasMove.run_id == run_id).order_by(SqlAliasMove.id)
    return [row.to_entity() for row in session.scalars(query)]
