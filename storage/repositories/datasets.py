"""Dataset versions: one immutable piece of data per (dataset, version), with its digest."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain import entities as e
from domain.errors import ConflictError, NotFoundError
from storage.orm import SqlDatasetVersion


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


def _dataset_version_row(session: Session, dataset_version_id: int) -> SqlDatasetVersion:
    row = session.get(SqlDatasetVersion, dataset_version_id)
    if row is None:
        raise NotFoundError(f"dataset version id {dataset_version_id} not found")
    return row


def get_dataset_version(session: Session, dataset_version_id: int) -> e.DatasetVersion:
    return _dataset_version_row(session, dataset_version_id).to_entity()


def set_dataset_sha256(session: Session, dataset_version_id: int, sha256: str) -> e.DatasetVersion:
    """Records the digest of a version's bytes the first time they are fetched; a different digest
    later is a conflict (the version's data changed under its name)."""
    row = _dataset_version_row(session, dataset_version_id)
    if row.sha256 is not None and row.sha256 != sha256:
        raise ConflictError(
            f"dataset {row.dataset!r} version {row.version!r} was recorded with sha256 {row.sha256}, now {sha256}"
        )
    row.sha256 = sha256
    session.flush()
    return row.to_entity()
