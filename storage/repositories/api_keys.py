"""API keys: stored as the sha256 of the secret with their scopes, found by prefix, revoked by name.

A revocation notifies `KEYS_CHANNEL` with its commit, so a model server that caches verdicts
(`serving/keys.py`) forgets them at once: in this process, and on PostgreSQL in every process.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import apikeys
from domain import entities as e
from domain.errors import ConflictError, InvalidInputError, NotFoundError
from storage.notify import KEYS_CHANNEL, notify
from storage.orm import SqlApiKey, utcnow


def _named(session: Session, name: str) -> SqlApiKey | None:
    return session.scalars(select(SqlApiKey).where(SqlApiKey.name == name)).one_or_none()


def create_api_key(session: Session, name: str, scopes: Iterable[str] = apikeys.DEFAULT_SCOPES) -> tuple[e.ApiKey, str]:
    """Returns (key, plaintext). The plaintext is shown once; only its sha256 is stored.
    `scopes`: scope names (`domain.apikeys.Scope`); by default `read` only."""
    if not name.strip():
        raise InvalidInputError("an API key needs a name, e.g. `retrainer apikey create ci-bot`")
    granted = apikeys.parse_scopes(scopes)
    if not granted:
        raise InvalidInputError("an API key needs at least one scope, e.g. --scope read")
    if _named(session, name) is not None:
        raise ConflictError(f"an API key named {name!r} already exists; pick another name")
    material = apikeys.generate_api_key()
    row = SqlApiKey(
        name=name, prefix=material.prefix, key_sha256=material.sha256, scopes=apikeys.format_scopes(granted)
    )
    session.add(row)
    session.flush()
    return row.to_entity(), material.plaintext


def provision_api_key(session: Session, name: str, scopes: Iterable[str]) -> tuple[e.ApiKey, str]:
    """A process's own key (`retrainer serve`'s canary controller, the demo's traffic): created, or, if
    `name` exists, given a new secret, exactly `scopes` and no revocation. The previous secret stops
    working: only the process that provisioned it held it."""
    row = _named(session, name)
    if row is None:
        return create_api_key(session, name, scopes)
    material = apikeys.generate_api_key()
    row.prefix, row.key_sha256 = material.prefix, material.sha256
    row.scopes, row.revoked_at = apikeys.format_scopes(apikeys.parse_scopes(scopes)), None
    notify(session, KEYS_CHANNEL, name)  # the old secret's cached verdicts go
    session.flush()
    return row.to_entity(), material.plaintext


def list_api_keys(session: Session) -> list[e.ApiKey]:
    """Every key, revoked ones too, by name."""
    return [row.to_entity() for row in session.scalars(select(SqlApiKey).order_by(SqlApiKey.name))]


def authenticate_api_key(session: Session, presented: str, *, touch: bool = True) -> e.ApiKey | None:
    """The key's entity if `presented` is a valid, unrevoked key; None otherwise. `touch` records the
    use (`last_used_at`); a caller that caches verdicts passes False, its uses being mostly unseen."""
    try:
        prefix = apikeys.prefix_of(presented)
    except InvalidInputError:
        return None
    row = session.scalars(select(SqlApiKey).where(SqlApiKey.prefix == prefix)).one_or_none()
    if row is None or row.revoked_at is not None or not apikeys.key_matches(presented, row.key_sha256):
        return None
    if touch:
        row.last_used_at = utcnow()
        session.flush()
    return row.to_entity()


def revoke_api_key(session: Session, name: str) -> e.ApiKey:
    row = _named(session, name)
    if row is None:
        raise NotFoundError(f"no API key named {name!r}; `retrainer apikey list` shows them")
    row.revoked_at = row.revoked_at or utcnow()
    notify(session, KEYS_CHANNEL, name)
    session.flush()
    return row.to_entity()
