"""API keys: stored as the sha256 of the secret, found by prefix, revoked by name."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import apikeys
from domain import entities as e
from domain.errors import ConflictError, InvalidInputError, NotFoundError
from storage.orm import SqlApiKey, utcnow


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
