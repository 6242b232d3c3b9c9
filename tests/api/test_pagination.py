"""GET /api/v1/runs pages with an opaque cursor: every run exactly once, newest first, ties broken
by run id, the same on SQLite and PostgreSQL (a row-value comparison on both)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from storage import repositories as repo
from storage.db import create_db_engine, transaction
from storage.orm import SqlRun
from tests.api.conftest import PIPELINE, error_code

RUNS = "/api/v1/runs"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest, _template_db: Path, tmp_path: Path) -> Iterator[str]:
    """The API conftest's SQLite copy, or a migrated PostgreSQL database of this test's own."""
    if request.param == "sqlite":
        yield request.getfixturevalue("db_url_sqlite_copy")
        return
    server = make_url(request.getfixturevalue("postgres_url"))
    name = f"retrainer_paging_{uuid.uuid4().hex[:8]}"
    admin = create_db_engine(server.render_as_string(hide_password=False))
    autocommit = admin.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        autocommit.execute(text(f'CREATE DATABASE "{name}"'))
        url = server.set(database=name).render_as_string(hide_password=False)
        migrations.upgrade(url)
        yield url
    finally:
        autocommit.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        autocommit.close()
        admin.dispose()


@pytest.fixture
def db_url_sqlite_copy(_template_db: Path, tmp_path: Path) -> str:
    path = tmp_path / "retrainer.db"
    path.write_bytes(_template_db.read_bytes())
    return f"sqlite:///{path}"


def _runs_at(sessions: sessionmaker[Session], pipeline: str, minutes: list[int]) -> list[str]:
    """Creates one run per entry, created `minutes` after T0 (equal entries: the same instant)."""
    ids = []
    with transaction(sessions) as session:
        for minute in minutes:
            run, _ = repo.create_run(session, pipeline, e.TriggerKind.MANUAL)
            moved = update(SqlRun).where(SqlRun.id == run.id).values(created_at=T0 + timedelta(minutes=minute))
            session.execute(moved)
            ids.append(run.id)
    return ids


def _newest_first(ids: list[str], minutes: list[int]) -> list[str]:
    return [run_id for _, run_id in sorted(zip(minutes, ids, strict=True), reverse=True)]


def _walk(client: TestClient, **params: str | int) -> tuple[list[str], int]:
    """Follows next_cursor to the end: the run ids in the order served, and the number of pages."""
    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get(RUNS, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages += 1
        seen += [run["run_id"] for run in body["runs"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, pages


def test_cursor_walks_every_run_once_newest_first_ties_by_id(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    minutes = [0, 5, 5, 5, 9, 2, 5]  # four runs share one instant: the id decides among them
    ids = _runs_at(sessions, PIPELINE, minutes)

    seen, pages = _walk(client, limit=2)

    assert seen == _newest_first(ids, minutes)
    assert pages == 4  # 2 + 2 + 2 + 1: the short page is the last, no empty page after it
    unpaged = client.get(RUNS, params={"limit": 1000}).json()
    assert [run["run_id"] for run in unpaged["runs"]] == seen
    assert unpaged["next_cursor"] is None


def test_cursor_with_a_pipeline_filter_and_an_exact_last_page(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, "other", "other-data", {"name": "other"})
    mine = _runs_at(sessions, PIPELINE, [1, 3, 5, 7])
    _runs_at(sessions, "other", [2, 4, 6, 8])

    seen, pages = _walk(client, pipeline=PIPELINE, limit=2)

    assert seen == list(reversed(mine))
    assert pages == 2  # a full last page already says null: more would need a fifth run
    first = client.get(RUNS, params={"pipeline": PIPELINE, "limit": 3}).json()
    rest = client.get(RUNS, params={"pipeline": PIPELINE, "limit": 3, "cursor": first["next_cursor"]}).json()
    assert [run["run_id"] for run in rest["runs"]] == [mine[0]] and rest["next_cursor"] is None


def test_a_cursor_the_api_did_not_give_out_is_refused_naming_the_fix(client: TestClient) -> None:
    for cursor in ("not-base64!", "bm9wZQ", "WyIyMDI2LTExLTAxVDEyOjAwOjAwIiwiYSJd", "W10"):
        # garbage, "nope", a position without a time zone, an empty list
        response = client.get(RUNS, params={"cursor": cursor})
        assert response.status_code == 400, (cursor, response.text)
        assert error_code(response) == "invalid_input"
        assert "next_cursor" in response.json()["error"]["message"]
    too_long = client.get(RUNS, params={"cursor": "A" * 201})
    assert too_long.status_code == 422 and error_code(too_long) == "invalid_request"


def test_an_unknown_query_parameter_is_refused_naming_it_and_the_known_ones(client: TestClient) -> None:
    """A misspelt filter (`?pipline=`) would otherwise be ignored and list every pipeline's runs
    (schemathesis found `?=0` accepted: its schema for the query string allows no other key)."""
    for params in [{"pipline": PIPELINE}, {"": "0"}]:
        response = client.get(RUNS, params=params)
        assert response.status_code == 422 and error_code(response) == "invalid_request", response.text
        message = response.json()["error"]["message"]
        assert "unknown query parameter" in message and "cursor, limit, pipeline" in message
    assert client.get(RUNS, params={"pipeline": PIPELINE, "limit": 5}).status_code == 200
