"""Pipelines: the registered specs a dataset's events trigger, and their freeze windows."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import entities as e
from domain.errors import NotFoundError
from storage.orm import SqlPipeline


def spec_digest(spec: dict[str, Any]) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def find_pipeline_row(session: Session, name: str, *, for_update: bool = False) -> SqlPipeline:
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
    return find_pipeline_row(session, name).to_entity()


def list_pipelines(session: Session) -> list[e.Pipeline]:
    return [row.to_entity() for row in session.scalars(select(SqlPipeline).order_by(SqlPipeline.name))]


def pipelines_for_dataset(session: Session, dataset: str) -> list[e.Pipeline]:
    query = select(SqlPipeline).where(SqlPipeline.dataset == dataset).order_by(SqlPipeline.name)
    return [row.to_entity() for row in session.scalars(query)]


def set_freeze(session: Session, name: str, until: datetime | None) -> e.Pipeline:
    row = find_pipeline_row(session, name)
    row.frozen_until = until
    session.flush()
    return row.to_entity()
