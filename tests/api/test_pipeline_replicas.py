"""`GET /api/v1/pipelines/{name}`: the pipeline and what each model-server replica serves of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from domain.evidence import REPLICA_MISSING_AFTER_S, ReplicaServing, ServingReplica
from storage import repositories as repo
from storage.db import transaction
from tests.api.conftest import PIPELINE, error_code


def _report(sessions: sessionmaker[Session], name: str, age_s: float, *, stopped: bool = False, **serving: str) -> None:
    now = datetime.now(UTC)
    heard = now - timedelta(seconds=age_s)
    replica = ServingReplica(
        replica=name, address=f"http://{name}:8080", started_at=now - timedelta(minutes=5), heartbeat_at=heard,
        stopped_at=heard if stopped else None, reports_windows=True,
        serving={PIPELINE: ReplicaServing.model_validate({**serving, "since": now - timedelta(minutes=1)})},
    )  # fmt: skip
    with transaction(sessions) as session:
        repo.report_replica(session, replica, seq=1, window_start=heard)


def test_the_pipeline_shows_each_replica_what_it_serves_and_whether_it_is_heard(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    _report(sessions, "a", 0.5, champion_version="1", canary_version="2", canary_weight="25")
    _report(sessions, "b", REPLICA_MISSING_AFTER_S + 10, champion_version="1")
    _report(sessions, "c", 30, stopped=True, champion_version="1")
    _report(sessions, "gone", 7200, champion_version="1")  # silent for hours: not shown

    body = client.get(f"/api/v1/pipelines/{PIPELINE}").json()

    assert body["name"] == PIPELINE and body["champion_version"] is None
    replicas = {r["replica"]: r for r in body["replicas"]}
    assert sorted(replicas) == ["a", "b", "c"]
    assert {name: r["state"] for name, r in replicas.items()} == {"a": "live", "b": "missing", "c": "stopped"}
    assert (replicas["a"]["champion_version"], replicas["a"]["canary_version"]) == ("1", "2")
    assert replicas["a"]["canary_weight"] == 25.0 and replicas["a"]["address"] == "http://a:8080"
    assert 0.0 <= replicas["a"]["heartbeat_age_seconds"] < REPLICA_MISSING_AFTER_S
    assert replicas["a"]["since"] is not None


def test_an_unknown_pipeline_is_404(client: TestClient) -> None:
    response = client.get("/api/v1/pipelines/nope")
    assert response.status_code == 404 and error_code(response) == "not_found"
