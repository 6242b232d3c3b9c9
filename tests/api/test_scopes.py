"""Scoped API keys on the HTTP API: each route needs its scope (403 naming it), a revoked key is
refused at once, decisions record the key's name, and keys older than scopes keep their powers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

import migrations
from api.app import create_app
from domain import apikeys
from domain import entities as e
from domain.apikeys import API_SCOPES, Scope
from domain.errors import ConflictError, InvalidInputError, NotFoundError
from domain.settings import load_settings
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.api.conftest import KEY_NAME, PIPELINE, SPEC, error_code
from tests.api.test_routes import register_version

PROMOTE = f"/api/v1/pipelines/{PIPELINE}/promote"
FREEZE = f"/api/v1/pipelines/{PIPELINE}/freeze"
REASON = "reviewed the evidence by hand"


def new_key(sessions: sessionmaker[Session], name: str, *scopes: str) -> str:
    with transaction(sessions) as session:
        _key, plaintext = repo.create_api_key(session, name, scopes or apikeys.DEFAULT_SCOPES)
    return plaintext


def champion_version(sessions: sessionmaker[Session]) -> int | None:
    with transaction(sessions) as session:
        champion = repo.get_champion(session, PIPELINE)
        return champion.version if champion else None


def test_each_route_needs_its_scope_and_403_names_it(
    make_app: Callable[..., FastAPI], sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    register_version(sessions, 1)
    reader = {"X-API-Key": new_key(sessions, "dashboard")}  # no --scope: read only
    trigger = {"X-API-Key": new_key(sessions, "ci", "trigger")}
    operator = {"X-API-Key": new_key(sessions, "alice", "read", "operate")}
    with TestClient(make_app()) as client:
        assert client.get("/api/v1/pipelines", headers=reader).status_code == 200
        assert client.get("/openapi.json", headers=reader).status_code == 200

        refused = client.post(PROMOTE, json={"version": 1, "reason": REASON}, headers=reader)
        assert refused.status_code == 403 and error_code(refused) == "forbidden"
        message = refused.json()["error"]["message"]
        assert "'operate'" in message and "dashboard" in message and "--scope operate" in message
        assert champion_version(sessions) is None  # refused before anything moved

        frozen = client.post(FREEZE, json={"until": "2030-01-01T00:00:00Z", "reason": REASON}, headers=trigger)
        assert frozen.status_code == 403 and "'operate'" in frozen.json()["error"]["message"]
        no_read = client.get("/api/v1/runs", headers=trigger)
        assert no_read.status_code == 403 and "'read'" in no_read.json()["error"]["message"]
        no_trigger = client.post("/api/v1/trigger/train", json={"pipeline": PIPELINE}, headers=operator)
        assert no_trigger.status_code == 403 and "'trigger'" in no_trigger.json()["error"]["message"]
        assert client.post("/api/v1/trigger/train", json={"pipeline": PIPELINE}, headers=trigger).status_code == 202

        # the decision's actor is the key's name
        promoted = client.post(PROMOTE, json={"version": 1, "reason": REASON}, headers=operator)
        assert promoted.status_code == 200 and promoted.json()["actor"] == "alice (force-promote)"
    with transaction(sessions) as session:
        (move,) = repo.alias_history(session, PIPELINE)
    assert (move.actor, move.reason) == ("alice (force-promote)", REASON)


def test_every_protected_operation_documents_403(app: FastAPI) -> None:
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            if path not in ("/healthz", "/metrics"):
                assert "403" in operation["responses"], (method, path)


def test_a_revoked_key_is_refused_at_once(
    client: TestClient, sessions: sessionmaker[Session], api_key: str, pipeline: e.Pipeline
) -> None:
    assert client.get("/api/v1/pipelines").status_code == 200
    with transaction(sessions) as session:
        revoked = repo.revoke_api_key(session, KEY_NAME)
    assert revoked.revoked_at is not None
    refused = client.get("/api/v1/pipelines")
    assert refused.status_code == 401 and error_code(refused) == "unauthorized"


def test_keys_are_listed_with_scopes_and_bad_scopes_refused(sessions: sessionmaker[Session]) -> None:
    new_key(sessions, "b-ops", "operate", "read", "operate")
    new_key(sessions, "a-view")
    with transaction(sessions) as session:
        listed = [(key.name, key.scopes) for key in repo.list_api_keys(session)]
        with pytest.raises(InvalidInputError, match=r"'root'.*choose from read, trigger"):
            repo.create_api_key(session, "x", ["root"])
        with pytest.raises(InvalidInputError, match="at least one scope"):
            repo.create_api_key(session, "x", [])
        with pytest.raises(ConflictError):
            repo.create_api_key(session, "a-view")
        with pytest.raises(NotFoundError, match="apikey list"):
            repo.revoke_api_key(session, "nobody")
    assert listed == [("a-view", frozenset({"read"})), ("b-ops", frozenset({"operate", "read"}))]


def test_provisioning_reissues_the_secret_with_exact_scopes(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        _first, old = repo.provision_api_key(session, apikeys.CONTROLLER_KEY_NAME, [Scope.OPERATE])
        repo.revoke_api_key(session, apikeys.CONTROLLER_KEY_NAME)
        again, new = repo.provision_api_key(session, apikeys.CONTROLLER_KEY_NAME, [Scope.OPERATE, Scope.READ])
        assert repo.authenticate_api_key(session, old) is None  # the old secret no longer works
        authenticated = repo.authenticate_api_key(session, new)
        assert authenticated is not None and authenticated.id == again.id
    assert again.revoked_at is None and again.scopes == {"operate", "read"}


def test_a_key_made_before_scopes_keeps_its_powers_after_migration_0007(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrations.upgrade(url, "0006")
    material = apikeys.generate_api_key()
    engine = create_db_engine(url)
    with engine.begin() as conn:  # a key as revision 0006 stored it: no scopes column yet
        conn.execute(
            text("INSERT INTO api_keys (name, prefix, key_sha256, created_at) VALUES ('old-bot', :p, :h, :t)"),
            {"p": material.prefix, "h": material.sha256, "t": "2026-11-01 00:00:00.000000"},
        )
    migrations.upgrade(url)
    sessions = make_sessions(engine)
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, PIPELINE, "digits", SPEC)
        (old,) = repo.list_api_keys(session)
    assert old.scopes == API_SCOPES
    register_version(sessions, 1)
    app = create_app(sessions=sessions, settings=load_settings(database_url=url, home_dir=tmp_path), submit=None)
    with TestClient(app, headers={"X-API-Key": material.plaintext}) as client:
        promoted = client.post(PROMOTE, json={"version": 1, "reason": REASON})
        assert promoted.status_code == 200 and promoted.json()["actor"] == "old-bot (force-promote)"
        assert client.post(FREEZE, json={"until": None, "reason": REASON}).status_code == 200
    assert champion_version(sessions) == 1
    engine.dispose()
