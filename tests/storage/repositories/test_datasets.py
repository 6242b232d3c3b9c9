"""Dataset versions: idempotent, immutable, with their digest, on SQLite and PostgreSQL (the `sessions` fixture)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain.errors import ConflictError, NotFoundError
from storage import repositories as repo
from tests.storage.repositories.conftest import SHA_A, SHA_B, tx


def test_dataset_version_is_idempotent_and_immutable(sessions: sessionmaker[Session]) -> None:
    first = tx(sessions, lambda s: repo.record_dataset_version(s, "digits", "v1", "s3://d/v1.csv", rows=10))
    again = tx(sessions, lambda s: repo.record_dataset_version(s, "digits", "v1", "s3://d/v1.csv", rows=10))
    assert again.id == first.id
    with pytest.raises(ConflictError) as info:
        tx(sessions, lambda s: repo.record_dataset_version(s, "digits", "v1", "s3://d/OTHER.csv"))
    assert info.value.code == "conflict" and "new version" in str(info.value)
    tx(sessions, lambda s: repo.record_dataset_version(s, "digits", "v2", "s3://d/v2.csv"))
    latest = tx(sessions, lambda s: repo.latest_dataset_version(s, "digits"))
    assert latest is not None and latest.version == "v2"
    assert tx(sessions, lambda s: repo.latest_dataset_version(s, "other")) is None


def test_dataset_digest_is_recorded_once_and_then_guarded(sessions: sessionmaker[Session]) -> None:
    version = tx(sessions, lambda s: repo.record_dataset_version(s, "digits", "v1", "s3://d/v1.csv"))
    assert version.sha256 is None
    tx(sessions, lambda s: repo.set_dataset_sha256(s, version.id, SHA_A))
    tx(sessions, lambda s: repo.set_dataset_sha256(s, version.id, SHA_A))  # the same bytes fetched again
    assert tx(sessions, lambda s: repo.get_dataset_version(s, version.id)).sha256 == SHA_A
    with pytest.raises(ConflictError) as changed:
        tx(sessions, lambda s: repo.set_dataset_sha256(s, version.id, SHA_B))
    assert changed.value.code == "conflict" and SHA_B in str(changed.value)
    with pytest.raises(NotFoundError) as missing:
        tx(sessions, lambda s: repo.get_dataset_version(s, version.id + 1000))
    assert missing.value.code == "not_found"
