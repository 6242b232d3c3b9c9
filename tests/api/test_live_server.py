"""The API under a real uvicorn server on a free port: 100 concurrent identical triggers with one
Idempotency-Key make exactly one run (the database decides, on SQLite and on PostgreSQL), and the
client speaks to it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

import migrations
from api.app import create_app
from api.client import ApiError, RetrainerClient
from api.server import parse_address, running_api
from domain import entities as e
from domain.apikeys import Scope
from domain.errors import ConfigurationError, TransientInfraError
from domain.settings import Settings, load_settings
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.api.conftest import SPEC, FakeSubmitter

CONCURRENT = 100


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest, db_url: str) -> Iterator[tuple[sessionmaker[Session], Settings]]:
    if request.param == "sqlite":
        url = db_url
    else:
        url = request.getfixturevalue("postgres_url")
        migrations.upgrade(url)
    engine = create_db_engine(url)
    yield make_sessions(engine), load_settings(database_url=url)
    engine.dispose()


def test_100_concurrent_identical_triggers_make_one_run(backend: tuple[sessionmaker[Session], Settings]) -> None:
    sessions, settings = backend
    suffix = uuid.uuid4().hex[:12]  # PostgreSQL is shared with other suites: unique names, no wiping
    pipeline = f"digits-{suffix}"
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, pipeline, f"digits-{suffix}", {**SPEC, "name": pipeline})
        _key, api_key = repo.create_api_key(session, f"load-{suffix}", [Scope.TRIGGER])
    submitter = FakeSubmitter()
    app = create_app(sessions=sessions, settings=settings, submit=submitter, rate_limit_per_minute=10_000)

    with running_api(app) as base_url:
        limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=CONCURRENT)
        headers = {"X-API-Key": api_key, "Idempotency-Key": f"deploy-{suffix}"}
        with httpx.Client(base_url=base_url, headers=headers, limits=limits, timeout=60) as http:
            barrier = threading.Barrier(CONCURRENT)

            def trigger(_: int) -> httpx.Response:
                barrier.wait()
                return http.post("/api/v1/trigger/train", json={"pipeline": pipeline, "reason": "load"})

            with ThreadPoolExecutor(CONCURRENT) as pool:
                responses = list(pool.map(trigger, range(CONCURRENT)))

    assert [r.status_code for r in responses] == [202] * CONCURRENT, {r.text for r in responses if r.status_code != 202}
    bodies = [r.json() for r in responses]
    assert len({b["run_id"] for b in bodies}) == 1
    assert sum(b["created"] for b in bodies) == 1
    assert len(submitter.runs) == 1 and submitter.runs[0].id == bodies[0]["run_id"]
    with transaction(sessions) as session:
        assert [run.id for run in repo.list_runs(session, pipeline, 1000)] == [bodies[0]["run_id"]]


def test_client_triggers_waits_and_reports_errors(
    sessions: sessionmaker[Session], settings: Settings, api_key: str, pipeline: e.Pipeline
) -> None:
    def submit(run: e.Run) -> str:
        # Stands in for the flow: the run is over before the client starts waiting.
        with transaction(sessions) as session:
            repo.update_run(session, run.id, status=e.RunStatus.RUNNING)
        with transaction(sessions) as session:
            repo.update_run(session, run.id, status=e.RunStatus.REJECTED)
        return "flow-run-1"

    app = create_app(sessions=sessions, settings=settings, submit=submit)
    with running_api(app) as base_url, RetrainerClient(base_url.removeprefix("http://"), api_key) as client:
        accepted = client.trigger(pipeline.name, "from the CLI", idempotency_key="cli-1")
        assert accepted["created"] is True
        assert client.trigger(pipeline.name, "from the CLI", idempotency_key="cli-1")["run_id"] == accepted["run_id"]
        record = client.wait(accepted["run_id"], timeout_s=10, poll_s=0.05)
        assert record["status"] == "rejected" and record["run_id"] == accepted["run_id"]

        with pytest.raises(ApiError) as missing:
            client.run("no-such-run")
        assert (missing.value.code, missing.value.status) == ("not_found", 404)
        with pytest.raises(ApiError) as reused:
            client.trigger(pipeline.name, "another reason", idempotency_key="cli-1")
        assert (reused.value.code, reused.value.status) == ("idempotency_key_reused", 422)
        with RetrainerClient(base_url, "rt_deadbeef_wrong") as stranger, pytest.raises(ApiError) as refused:
            stranger.run(accepted["run_id"])
        assert refused.value.code == "unauthorized" and "401" in str(refused.value)

    with RetrainerClient(base_url, api_key, timeout_s=2) as gone, pytest.raises(TransientInfraError) as down:
        gone.run(accepted["run_id"])  # the server has stopped
    assert "RETRAINER_API_ADDRESS" in str(down.value)


def test_parse_address(tmp_path: Path) -> None:
    assert parse_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", ":80", "host:99999", "host:http"):
        with pytest.raises(ConfigurationError) as info:
            parse_address(bad)
        assert info.value.code == "configuration_error" and "RETRAINER_API_ADDRESS" in str(info.value)
