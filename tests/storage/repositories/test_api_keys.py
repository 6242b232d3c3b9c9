"""API keys, on SQLite and PostgreSQL (the `sessions` fixture)."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from domain.errors import ConflictError
from storage import repositories as repo
from storage.orm import SqlApiKey
from tests.storage.repositories.conftest import tx


def test_api_keys_are_stored_hashed_and_verified(sessions: sessionmaker[Session]) -> None:
    key, plaintext = tx(sessions, lambda s: repo.create_api_key(s, "ci-bot"))
    stored = tx(sessions, lambda s: s.scalars(select(SqlApiKey)).one().key_sha256)
    assert plaintext not in stored and len(stored) == 64
    ok = tx(sessions, lambda s: repo.authenticate_api_key(s, plaintext))
    assert ok is not None and ok.name == "ci-bot" and ok.last_used_at is not None
    assert tx(sessions, lambda s: repo.authenticate_api_key(s, plaintext[:-1] + "x")) is None
    assert tx(sessions, lambda s: repo.authenticate_api_key(s, "garbage")) is None
    with pytest.raises(ConflictError):
        tx(sessions, lambda s: repo.create_api_key(s, "ci-bot"))
    tx(sessions, lambda s: repo.revoke_api_key(s, "ci-bot"))
    assert tx(sessions, lambda s: repo.authenticate_api_key(s, plaintext)) is None
    assert key.revoked_at is None
