"""The routes of CONTRACT section 3 and the overrides, through FastAPI's TestClient on SQLite."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.errors import ERROR_CODE_TO_HTTP_STATUS, IdempotencyKeyReusedError, status_for
from domain import entities as e
from domain import errors
from domain.canary_stats import error_rate_check
from domain.evidence import CanaryAction, CanaryAttempt, StepAnalysis, VariantWindow
from domain.settings import Settings
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.api.conftest import PIPELINE, FakeSubmitter, error_code

TRIGGER = "/api/v1/trigger/train"
RUN_KEYS = {"run_id", "pipeline", "status", "trigger", "model_version", "decision", "created_at", "finished_at"}


def register_version(sessions: sessionmaker[Session], n: int, run_id: str | None = None) -> e.ModelVersion:
    with transaction(sessions) as session:
        return repo.register_model_version(
            session,
            PIPELINE,
            artifact_uri=f"file:///tmp/models/{n}",
            sha256=f"{n:x}" * 64,
            size_bytes=1000 + n,
            metrics={"accuracy": 0.9 + n / 100},
            run_id=run_id,
        )


def make_champion(sessions: sessionmaker[Session], version: e.ModelVersion, previous: e.ModelVersion | None) -> None:
    with transaction(sessions) as session:
        repo.move_champion(
            session,
            PIPELINE,
            version.id,
            expected_from_version_id=previous.id if previous else None,
            actor="test",
            reason="passed the gate",
        )


# ------------------------------------------------------------------------------------ trigger


def test_trigger_queues_a_run_and_submits_it_once(client: TestClient, submitter: FakeSubmitter) -> None:
    response = client.post(TRIGGER, json={"pipeline": PIPELINE, "reason": "new labels"})
    assert response.status_code == 202
    body = response.json()
    assert body == {"run_id": body["run_id"], "status": "queued", "created": True}
    assert response.headers["Location"] == f"/api/v1/runs/{body['run_id']}"
    assert [run.id for run in submitter.runs] == [body["run_id"]]
    assert submitter.runs[0].trigger_kind is e.TriggerKind.MANUAL
    shown = client.get(f"/api/v1/runs/{body['run_id']}").json()
    assert shown["trigger"]["kind"] == "manual"
    assert shown["trigger"]["reason"] == "new labels (API key ci-bot)"
    assert shown["prefect_flow_run_id"] == "flow-run-1"
    # Without an Idempotency-Key every request is a new run.
    again = client.post(TRIGGER, json={"pipeline": PIPELINE, "reason": "new labels"})
    assert again.status_code == 202 and again.json()["run_id"] != body["run_id"]


def test_idempotency_key_same_body_same_run_other_body_422(client: TestClient, submitter: FakeSubmitter) -> None:
    headers = {"Idempotency-Key": "ticket-42"}
    first = client.post(TRIGGER, json={"pipeline": PIPELINE, "reason": "r"}, headers=headers)
    # The same body in another key order and spacing is the same request (canonical JSON).
    replay = client.post(
        TRIGGER,
        content=b'{ "reason": "r",   "pipeline": "digits-classifier" }',
        headers={**headers, "Content-Type": "application/json"},
    )
    assert first.status_code == replay.status_code == 202
    assert replay.json() == {"run_id": first.json()["run_id"], "status": "queued", "created": False}
    assert len(submitter.runs) == 1

    other = client.post(TRIGGER, json={"pipeline": PIPELINE, "reason": "something else"}, headers=headers)
    assert other.status_code == 422
    assert error_code(other) == "idempotency_key_reused"
    assert "ticket-42" in other.json()["error"]["message"] and "new key" in other.json()["error"]["message"]
    assert len(submitter.runs) == 1


def test_trigger_refusals(client: TestClient, submitter: FakeSubmitter) -> None:
    unknown = client.post(TRIGGER, json={"pipeline": "nope", "reason": "x"})
    assert unknown.status_code == 404 and error_code(unknown) == "not_found"
    assert "digits-classifier" in unknown.json()["error"]["message"]  # names the known pipelines
    for bad in ({}, {"pipeline": ""}, {"pipeline": PIPELINE, "typo": 1}, {"pipeline": 3}):
        response = client.post(TRIGGER, json=bad)
        assert response.status_code == 422, bad
        assert error_code(response) == "invalid_request"
    malformed = client.post(TRIGGER, content=b"{not json", headers={"Content-Type": "application/json"})
    assert malformed.status_code == 422 and error_code(malformed) == "invalid_request"
    too_long_key = client.post(TRIGGER, json={"pipeline": PIPELINE}, headers={"Idempotency-Key": "k" * 201})
    assert too_long_key.status_code == 422 and error_code(too_long_key) == "invalid_request"
    assert submitter.runs == []


def test_a_backing_service_that_does_not_answer_is_503_with_retry_after(
    make_app: Callable[..., FastAPI], api_key: str, pipeline: e.Pipeline
) -> None:
    # The API key is checked against the working database; the route's own reads go to one that is down.
    down = make_sessions(create_db_engine("postgresql+psycopg://u:p@127.0.0.1:1/retrainer"))
    app = make_app()
    with TestClient(app, headers={"X-API-Key": api_key}) as client:
        app.state.retrainer = dataclasses.replace(app.state.retrainer, sessions=down)
        response = client.get("/api/v1/runs/some-run")
    assert response.status_code == 503
    assert error_code(response) == "infrastructure_unavailable"
    assert response.headers["Retry-After"] == "5"


# --------------------------------------------------------------------------------------- runs


def test_run_shows_the_contract_shape(client: TestClient, sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        repo.add_to_inbox(
            session, event_id="ev-1", source="//etl", type="retrainer.data.changed", dataset="digits", payload={}
        )
        run, _ = repo.create_run(session, PIPELINE, e.TriggerKind.EVENT, reason="1 event", event_ids=["ev-1"])
    version = register_version(sessions, 1, run_id=run.id)
    with transaction(sessions) as session:
        repo.update_run(session, run.id, status=e.RunStatus.RUNNING, model_version_id=version.id)
        repo.update_run(session, run.id, status=e.RunStatus.REJECTED, evidence={"outcome": "rejected by the gate"})

    body = client.get(f"/api/v1/runs/{run.id}").json()
    assert set(body) >= RUN_KEYS
    assert body["run_id"] == run.id and body["pipeline"] == PIPELINE and body["status"] == "rejected"
    assert body["trigger"]["kind"] == "event" and body["trigger"]["event_ids"] == ["ev-1"]
    assert body["model_version"] == 1
    assert body["decision"]["outcome"] == "rejected by the gate"
    assert datetime.fromisoformat(body["finished_at"]) >= datetime.fromisoformat(body["created_at"])

    missing = client.get("/api/v1/runs/no-such-run")
    assert missing.status_code == 404 and error_code(missing) == "not_found"
    assert "no-such-run" in missing.json()["error"]["message"]


def test_runs_list_newest_first_with_limit_and_filter(client: TestClient, sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, "other", "other-data", {"name": "other"})
    ids = [client.post(TRIGGER, json={"pipeline": PIPELINE, "reason": str(i)}).json()["run_id"] for i in range(3)]
    other = client.post(TRIGGER, json={"pipeline": "other"}).json()["run_id"]

    runs = client.get("/api/v1/runs").json()["runs"]
    assert [r["run_id"] for r in runs] == [other, *reversed(ids)]
    assert set(runs[0]) >= RUN_KEYS - {"decision"}
    assert "decision" not in runs[0]  # summaries; the record is at /api/v1/runs/{run_id}
    assert runs[0]["trigger"] == {"kind": "manual", "event_ids": []}

    filtered = client.get("/api/v1/runs", params={"pipeline": PIPELINE, "limit": 2}).json()["runs"]
    assert [r["run_id"] for r in filtered] == [ids[2], ids[1]]
    unknown = client.get("/api/v1/runs", params={"pipeline": "nope"})
    assert unknown.status_code == 404 and error_code(unknown) == "not_found"
    for limit in (0, 1001, "many"):
        bad = client.get("/api/v1/runs", params={"limit": limit})
        assert bad.status_code == 422 and error_code(bad) == "invalid_request"


# ---------------------------------------------------------------------------------- pipelines


def test_pipelines_and_models(client: TestClient, sessions: sessionmaker[Session]) -> None:
    assert client.get("/api/v1/pipelines").json() == {
        "pipelines": [{"name": PIPELINE, "dataset": "digits", "champion_version": None, "frozen_until": None}]
    }
    assert client.get(f"/api/v1/pipelines/{PIPELINE}/models").json() == {"versions": []}
    v1, v2 = register_version(sessions, 1), register_version(sessions, 2, run_id=None)
    make_champion(sessions, v1, None)

    pipelines = client.get("/api/v1/pipelines").json()["pipelines"]
    assert pipelines[0]["champion_version"] == 1
    versions = client.get(f"/api/v1/pipelines/{PIPELINE}/models").json()["versions"]
    assert [(v["version"], v["stage"]) for v in versions] == [(2, "candidate"), (1, "champion")]
    assert versions[1]["metrics"] == {"accuracy": pytest.approx(0.91)}
    assert versions[1]["sha256"] == v1.sha256 and versions[0]["run_id"] is None
    assert {"version", "stage", "metrics", "sha256", "run_id"} <= set(versions[0])
    assert v2.version == 2

    missing = client.get("/api/v1/pipelines/nope/models")
    assert missing.status_code == 404 and error_code(missing) == "not_found"


def test_rollout_404_then_current_then_outcome(client: TestClient, sessions: sessionmaker[Session]) -> None:
    url = f"/api/v1/pipelines/{PIPELINE}/rollout"
    none_yet = client.get(url)
    assert none_yet.status_code == 404 and error_code(none_yet) == "not_found"
    assert "canary" in none_yet.json()["error"]["message"]
    assert client.get("/api/v1/pipelines/nope/rollout").status_code == 404

    v1, v2 = register_version(sessions, 1), register_version(sessions, 2)
    with transaction(sessions) as session:
        rollout = repo.start_rollout(
            session, PIPELINE, candidate_version_id=v2.id, champion_version_id=v1.id, policy={"steps": [10, 50, 100]}
        )
    started = client.get(url).json()
    # the model server serves the first step's share as soon as the rollout is active
    assert started["status"] == "active" and started["steps"] == [] and started["traffic_percent"] == 10
    assert started["outcome"] is None and started["policy"] == {"steps": [10, 50, 100]}

    # the judge's evidence for one check, as domain/canary_stats.py builds it
    tested = error_rate_check(0, 250, max_error_rate=0.01, alpha=0.005, final=True)
    attempt = CanaryAttempt(
        action=CanaryAction.ADVANCE,
        reason="step 1 at 10 % passed: on to 50 %",
        at=datetime(2026, 11, 23, 10, 0, tzinfo=UTC),
        elapsed_seconds=31.0,
        traffic_percent=50.0,
        canary=VariantWindow(version="2", requests=250, latency_p99_ms=3.0, class_counts={"0": 250}),
        champion=VariantWindow(version="1", requests=2250, errors=1, latency_p99_ms=2.9),
        checks=(tested.to_gate_check(),),
        evidence=(tested,),
    )
    with transaction(sessions) as session:
        repo.begin_rollout_step(session, rollout.id, traffic_percent=10)
        repo.record_step_attempt(session, rollout.id, 0, attempt, verdict=e.Verdict.PASS, next_step=1)
    active = client.get(url).json()
    assert (active["candidate_version"], active["champion_version"], active["current_step"]) == (2, 1, 1)
    assert active["traffic_percent"] == 50
    (step,) = active["steps"]
    assert step["verdict"] == "pass" and step["traffic_percent"] == 10
    analysis = StepAnalysis.model_validate(step["analysis"])
    assert analysis.action is CanaryAction.ADVANCE and analysis.attempts == (attempt,)
    assert step["analysis"]["attempts"][0]["canary"]["requests"] == 250
    # each check's test is in the answer: outcome, level, interval, p-value and sample size
    (shown,) = step["analysis"]["attempts"][0]["evidence"]
    assert (shown["check"], shown["outcome"], shown["alpha"], shown["canary_n"]) == ("error_rate", "pass", 0.005, 250)
    assert shown["threshold"] == 0.01 and shown["p_value"] == 1.0
    assert shown["interval"][0] == 0.0 and 0.0 < shown["interval"][1] < 0.03

    with transaction(sessions) as session:
        repo.finish_rollout(session, rollout.id, e.RolloutStatus.ROLLED_BACK, "p99 ratio 3.1 > 1.2")
    finished = client.get(url).json()
    assert finished["traffic_percent"] == 0
    assert finished["outcome"]["status"] == "rolled_back"
    assert finished["outcome"]["reason"] == "p99 ratio 3.1 > 1.2"


# ---------------------------------------------------------------------------------- overrides


def test_promote_rollback_and_their_refusals(client: TestClient, sessions: sessionmaker[Session]) -> None:
    register_version(sessions, 1), register_version(sessions, 2)
    url = f"/api/v1/pipelines/{PIPELINE}"
    reason = "reviewed the evidence by hand"

    promoted = client.post(f"{url}/promote", json={"version": 1, "reason": reason})
    assert promoted.status_code == 200
    assert promoted.json()["champion_version"] == 1 and promoted.json()["previous_version"] is None
    assert promoted.json()["actor"].startswith("ci-bot")

    again = client.post(f"{url}/promote", json={"version": 1, "reason": reason})
    assert again.status_code == 409 and error_code(again) == "conflict"
    short = client.post(f"{url}/promote", json={"version": 2, "reason": "because"})
    assert short.status_code == 400 and error_code(short) == "invalid_input"
    assert "10 characters" in short.json()["error"]["message"]
    missing = client.post(f"{url}/promote", json={"version": 9, "reason": reason})
    assert missing.status_code == 404 and error_code(missing) == "not_found"

    by_alice = client.post(f"{url}/promote", json={"version": 2, "reason": reason, "actor": "alice"})
    assert by_alice.json()["actor"].startswith("alice (API key ci-bot)")
    assert (by_alice.json()["champion_version"], by_alice.json()["previous_version"]) == (2, 1)

    never = client.post(f"{url}/rollback", json={"to_version": 3, "reason": reason})
    assert never.status_code == 404 and error_code(never) == "not_found"
    rolled = client.post(f"{url}/rollback", json={"to_version": None, "reason": "v2 misbehaves in production"})
    assert rolled.status_code == 200
    assert (rolled.json()["champion_version"], rolled.json()["previous_version"]) == (1, 2)
    stages = {v["version"]: v["stage"] for v in client.get(f"{url}/models").json()["versions"]}
    assert stages == {1: "champion", 2: "rolled_back"}
    assert client.get("/api/v1/pipelines").json()["pipelines"][0]["champion_version"] == 1


def test_rollback_without_a_champion_is_a_conflict(client: TestClient) -> None:
    response = client.post(
        f"/api/v1/pipelines/{PIPELINE}/rollback", json={"to_version": None, "reason": "nothing to roll back"}
    )
    assert response.status_code == 409 and error_code(response) == "conflict"
    assert "no champion" in response.json()["error"]["message"]


def test_freeze_and_unfreeze(client: TestClient) -> None:
    url = f"/api/v1/pipelines/{PIPELINE}/freeze"
    until = datetime(2031, 12, 24, tzinfo=UTC)
    frozen = client.post(url, json={"until": until.isoformat(), "reason": "holiday change freeze"})
    assert frozen.status_code == 200
    assert datetime.fromisoformat(frozen.json()["frozen_until"]) == until
    listed = client.get("/api/v1/pipelines").json()["pipelines"][0]
    assert datetime.fromisoformat(listed["frozen_until"]) == until

    naive = client.post(url, json={"until": "2031-12-24T00:00:00", "reason": "no zone"})
    assert naive.status_code == 422 and error_code(naive) == "invalid_request"
    assert "until" in naive.json()["error"]["message"]
    offset = client.post(url, json={"until": "2031-12-24T01:00:00+01:00", "reason": "zone as offset"})
    assert datetime.fromisoformat(offset.json()["frozen_until"]) == until
    missing = client.post("/api/v1/pipelines/nope/freeze", json={"until": None, "reason": "x"})
    assert missing.status_code == 404 and error_code(missing) == "not_found"

    lifted = client.post(url, json={"until": None, "reason": "freeze over"})
    assert lifted.json() == {"pipeline": PIPELINE, "frozen_until": None}


# ------------------------------------------------------------------------------ health, metrics


def test_healthz_ok_then_503_naming_the_failing_probe(
    make_app: Callable[..., FastAPI], app: FastAPI, pipeline: e.Pipeline
) -> None:
    with TestClient(app) as anonymous:
        ok = anonymous.get("/healthz")
    assert ok.status_code == 200
    assert ok.json() == {"status": "ok", "checks": {"database": {"status": "ok"}}}

    def kafka() -> None:
        raise errors.TransientInfraError("RETRAINER_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092: broker does not answer")

    def crashing() -> None:
        raise RuntimeError("probe bug")

    probes = {"database": lambda: None, "kafka": kafka, "artifacts": crashing}
    with TestClient(make_app(health_probes=probes)) as anonymous:
        failing = anonymous.get("/healthz")
    assert failing.status_code == 503
    body = failing.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == {"status": "ok"}
    assert body["checks"]["kafka"]["code"] == "infrastructure_unavailable"
    assert body["checks"]["artifacts"]["status"] == "failing"
    assert error_code(failing) == "unhealthy"
    assert "kafka: RETRAINER_KAFKA_BOOTSTRAP_SERVERS" in body["error"]["message"]


def test_the_default_probe_is_the_database_of_the_sessions(
    make_app: Callable[..., FastAPI], tmp_path: Path, settings: Settings
) -> None:
    unreadable = tmp_path / "a-directory.db"  # SQLite cannot open a directory: the database does not answer
    unreadable.mkdir()
    engine = create_db_engine(f"sqlite:///{unreadable}")
    with TestClient(make_app(sessions=make_sessions(engine))) as anonymous:
        failing = anonymous.get("/healthz")
    engine.dispose()
    assert failing.status_code == 503 and error_code(failing) == "unhealthy"
    assert failing.json()["checks"]["database"]["code"] == "infrastructure_unavailable"
    assert "database: RETRAINER_DATABASE_URL=" in failing.json()["error"]["message"]

    with pytest.raises(errors.ConfigurationError) as unbound:
        create_app(sessions=sessionmaker(), settings=settings, submit=None)
    assert unbound.value.code == "configuration_error"
    assert "build it with storage.db.make_sessions" in unbound.value.message


def test_metrics_are_public_prometheus_text(client: TestClient, app: FastAPI) -> None:
    client.post(TRIGGER, json={"pipeline": PIPELINE})
    with TestClient(app) as anonymous:
        response = anonymous.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'retrainer_runs_created_total{trigger="manual"}' in response.text


# ---------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.InvalidInputError("x"), 400),
        (errors.SpecError(["a: b"]), 400),
        (errors.UnsafeArtifactKeyError("x"), 400),
        (errors.NotFoundError("x"), 404),
        (errors.ArtifactNotFoundError("x"), 404),
        (errors.ConflictError("x"), 409),
        (errors.ArtifactExistsError("x"), 409),
        (IdempotencyKeyReusedError("x"), 422),
        (errors.ConfigurationError("x"), 500),
        (errors.ArtifactIntegrityError("x"), 500),
        (errors.TrainingError("x"), 500),
        (errors.InfrastructureError("x"), 502),
        (errors.TransientInfraError("x"), 503),
        (errors.RetrainerError("x"), 500),
    ],
)
def test_one_mapping_from_code_to_status(error: errors.RetrainerError, status: int) -> None:
    assert status_for(error) == status


def test_every_domain_error_class_is_mapped_by_its_own_code_or_its_parents() -> None:
    def subclasses(cls: type[errors.RetrainerError]) -> list[type[errors.RetrainerError]]:
        return [cls, *(sub for child in cls.__subclasses__() for sub in subclasses(child))]

    # Below the root, no error may fall through to the root's generic 500 by accident.
    for cls in subclasses(errors.RetrainerError)[1:]:
        if cls.__module__ not in ("domain.errors", "api.errors"):
            continue
        codes = [c.code for c in cls.__mro__ if issubclass(c, errors.RetrainerError) and c is not errors.RetrainerError]
        assert any(code in ERROR_CODE_TO_HTTP_STATUS for code in codes), cls


def test_rollout_abort_and_manual_promote(client: TestClient, sessions: sessionmaker[Session]) -> None:
    url = f"/api/v1/pipelines/{PIPELINE}/rollout"
    reason = "incident 7: stop all canaries"
    nothing = client.post(f"{url}/abort", json={"reason": reason})
    assert nothing.status_code == 409 and "no active canary rollout" in nothing.json()["error"]["message"]

    v1, v2, v3 = register_version(sessions, 1), register_version(sessions, 2), register_version(sessions, 3)
    make_champion(sessions, v1, None)
    with transaction(sessions) as session:
        repo.start_rollout(
            session, PIPELINE, candidate_version_id=v2.id, champion_version_id=v1.id, policy={"steps": [50, 100]}
        )
    short = client.post(f"{url}/abort", json={"reason": "no"})
    assert short.status_code == 400 and "10 characters" in short.json()["error"]["message"]
    assert client.post(f"{url}/abort", json={}).status_code == 422
    aborted = client.post(f"{url}/abort", json={"reason": reason, "actor": "alice"})
    assert aborted.status_code == 200
    body = aborted.json()
    assert body["status"] == "aborted" and body["traffic_percent"] == 0
    assert (
        body["outcome"]["reason"].startswith("aborted by alice (API key ci-bot)")
        and reason in body["outcome"]["reason"]
    )
    stages = {v["version"]: v["stage"] for v in client.get(f"/api/v1/pipelines/{PIPELINE}/models").json()["versions"]}
    assert stages == {1: "champion", 2: "rolled_back", 3: "candidate"}

    with transaction(sessions) as session:
        repo.start_rollout(
            session, PIPELINE, candidate_version_id=v3.id, champion_version_id=v1.id, policy={"steps": [50, 100]}
        )
    promoted = client.post(f"{url}/promote", json={"reason": "looked right on the dashboards"})
    assert promoted.status_code == 200 and promoted.json()["status"] == "promoted"
    assert promoted.json()["traffic_percent"] == 100
    pipelines = client.get("/api/v1/pipelines").json()["pipelines"]
    assert pipelines[0]["champion_version"] == 3
    again = client.post(f"{url}/promote", json={"reason": "looked right on the dashboards"})
    assert again.status_code == 409
    assert client.post("/api/v1/pipelines/nope/rollout/abort", json={"reason": reason}).status_code == 404


def test_a_prefect_outage_during_a_trigger_still_answers_queued(
    make_app: Callable[..., FastAPI], api_key: str, pipeline: e.Pipeline, sessions: sessionmaker[Session]
) -> None:
    def prefect_down(_run: e.Run) -> str:
        raise ConnectionRefusedError("Prefect API at http://127.0.0.1:1/api does not answer")

    with TestClient(make_app(submit=prefect_down), headers={"X-API-Key": api_key}) as client:
        response = client.post(TRIGGER, json={"pipeline": PIPELINE, "reason": "new labels"})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    with transaction(sessions) as session:
        waiting = repo.unsubmitted_runs(session)
    # The claim was released: the trigger service's next pass submits it.
    assert [run.id for run in waiting] == [response.json()["run_id"]]
