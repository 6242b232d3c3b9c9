"""Fixtures of the API tests: a fresh migrated SQLite database per test, a registered pipeline,
an API key, a recording fake submitter and an app factory.

Each test gets its own copy of one migrated template database (migrating once per session keeps
the suite fast). Tests that need a real server use `api.server.running_api` (a free port).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import migrations
from api.app import create_app
from domain import entities as e
from domain.apikeys import API_SCOPES
from domain.settings import Settings, load_settings
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction

PIPELINE = "digits-classifier"
SPEC = {"name": PIPELINE, "dataset": "digits", "model": {"architecture": "mlp"}}
KEY_NAME = "ci-bot"


class FakeSubmitter:
    """Records the runs it was asked to start; returns a fake flow-run id."""

    def __init__(self) -> None:
        self.runs: list[e.Run] = []
        self._lock = threading.Lock()

    def __call__(self, run: e.Run) -> str:
        with self._lock:
            self.runs.append(run)
            return f"flow-run-{len(self.runs)}"


@pytest.fixture(scope="session")
def _template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "retrainer.db"
    migrations.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def db_url(_template_db: Path, tmp_path: Path) -> str:
    path = tmp_path / "retrainer.db"
    shutil.copyfile(_template_db, path)
    return f"sqlite:///{path}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_db_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessions(engine)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return load_settings(database_url=db_url, home_dir=tmp_path)


@pytest.fixture
def pipeline(sessions: sessionmaker[Session]) -> e.Pipeline:
    with transaction(sessions) as session:
        return repo.upsert_pipeline(session, PIPELINE, "digits", SPEC)


@pytest.fixture
def api_key(sessions: sessionmaker[Session]) -> str:
    with transaction(sessions) as session:
        _key, plaintext = repo.create_api_key(session, KEY_NAME, API_SCOPES)
    return plaintext


@pytest.fixture
def submitter() -> FakeSubmitter:
    return FakeSubmitter()


@pytest.fixture
def make_app(sessions: sessionmaker[Session], settings: Settings, submitter: FakeSubmitter) -> Callable[..., FastAPI]:
    def make(**overrides: Any) -> FastAPI:
        options: dict[str, Any] = {"sessions": sessions, "settings": settings, "submit": submitter, **overrides}
        return create_app(**options)

    return make


@pytest.fixture
def app(make_app: Callable[..., FastAPI]) -> FastAPI:
    return make_app()


@pytest.fixture
def client(app: FastAPI, api_key: str, pipeline: e.Pipeline) -> Iterator[TestClient]:
    with TestClient(app, headers={"X-API-Key": api_key}) as test_client:
        yield test_client


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) >= {"error"}, body
    assert body["error"]["message"], body
    return str(body["error"]["code"])
