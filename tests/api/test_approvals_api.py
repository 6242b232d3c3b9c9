"""POST /api/v1/runs/{run_id}/approve and /reject: the `operate` scope, a reason of 10 characters
(400), 404 for an unknown run, 409 naming the status of a run that does not wait, and each decision
in the decision record and the alias history. The waiting runs are what the pipeline flow leaves
(flows.approvals.after_gate), without training a model: tests/flows/test_approvals.py runs the flow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from storage import repositories as repo
from storage.db import transaction
from tests.api.approval_runs import APPROVAL_SPEC, waiting_run
from tests.api.conftest import KEY_NAME, PIPELINE, error_code

REASON = "reviewed the gate evidence with the team"


def new_key(sessions: sessionmaker[Session], name: str, *scopes: str) -> str:
    # not tests.api.test_scopes.new_key: importing that module ahead of test_schemathesis changes what
    # schemathesis generates there (GET /api/v1/runs then meets a case it fails)
    with transaction(sessions) as session:
        return repo.create_api_key(session, name, scopes)[1]


def approval_pipeline(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, PIPELINE, "digits", APPROVAL_SPEC)


def new_waiting_run(sessions: sessionmaker[Session]) -> e.Run:
    with transaction(sessions) as session:
        return waiting_run(session)


@pytest.fixture
def run(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> e.Run:
    """A run awaiting approval under the pipeline's spec, which asks for it."""
    approval_pipeline(sessions)
    return new_waiting_run(sessions)


def champion(sessions: sessionmaker[Session]) -> e.ModelVersion | None:
    with transaction(sessions) as session:
        return repo.get_champion(session, PIPELINE)


def assert_does_not_wait(client: TestClient, run_id: str, status: str) -> None:
    for action in ("approve", "reject"):
        refused = client.post(f"/api/v1/runs/{run_id}/{action}", json={"reason": REASON})
        assert refused.status_code == 409 and error_code(refused) == "conflict"
        assert f"run {run_id} is {status}, not awaiting_approval" in refused.json()["error"]["message"]


def test_approve_moves_the_champion_with_the_key_as_actor(
    client: TestClient, sessions: sessionmaker[Session], run: e.Run
) -> None:
    assert run.status is e.RunStatus.AWAITING_APPROVAL and not run.status.is_final
    assert champion(sessions) is None  # untouched while it waits

    response = client.post(f"/api/v1/runs/{run.id}/approve", json={"reason": f"  {REASON}  "})
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["status"] == "promoted" and record["run_id"] == run.id
    approval = record["decision"]["outcome"]["approval"]
    assert (approval["decision"], approval["actor"], approval["reason"]) == ("approved", KEY_NAME, REASON)
    assert [(m["actor"], m["reason"]) for m in record["decision"]["alias_moves"]] == [(KEY_NAME, REASON)]
    now = champion(sessions)
    assert now is not None and now.id == run.model_version_id and now.stage is e.ModelStage.CHAMPION

    assert_does_not_wait(client, run.id, "promoted")


def test_reject_ends_the_run_rejected_with_actor_and_reason(
    client: TestClient, sessions: sessionmaker[Session], run: e.Run
) -> None:
    response = client.post(f"/api/v1/runs/{run.id}/reject", json={"reason": "the data of this week is suspect"})
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["status"] == "rejected" and record["finished_at"] is not None
    outcome = record["decision"]["outcome"]
    assert outcome["reason"] == f"rejected by {KEY_NAME}: the data of this week is suspect"
    assert outcome["approval"]["decision"] == "rejected" and outcome["approval"]["actor"] == KEY_NAME
    assert record["decision"]["alias_moves"] == [] and champion(sessions) is None
    with transaction(sessions) as session:
        assert repo.get_model_version_by_id(session, run.model_version_id or 0).stage is e.ModelStage.REJECTED

    assert_does_not_wait(client, run.id, "rejected")


def test_refusals_404_400_409(client: TestClient, sessions: sessionmaker[Session], run: e.Run) -> None:
    for action in ("approve", "reject"):
        unknown = client.post(f"/api/v1/runs/no-such-run/{action}", json={"reason": REASON})
        assert unknown.status_code == 404 and error_code(unknown) == "not_found"
        short = client.post(f"/api/v1/runs/{run.id}/{action}", json={"reason": "   ok now   "})
        assert short.status_code == 400 and error_code(short) == "invalid_input"
        assert "at least 10 characters" in short.json()["error"]["message"]
        missing = client.post(f"/api/v1/runs/{run.id}/{action}", json={})
        assert missing.status_code == 422 and error_code(missing) == "invalid_request"
    with transaction(sessions) as session:
        queued, _ = repo.create_run(session, PIPELINE, e.TriggerKind.MANUAL)
        assert repo.get_run(session, run.id).status is e.RunStatus.AWAITING_APPROVAL  # still waits
    assert_does_not_wait(client, queued.id, "queued")


def test_approve_and_reject_need_the_operate_scope(make_app: Any, sessions: sessionmaker[Session], run: e.Run) -> None:
    reader = {"X-API-Key": new_key(sessions, "dashboard", "read")}
    trigger = {"X-API-Key": new_key(sessions, "ci", "trigger")}
    operator = {"X-API-Key": new_key(sessions, "alice", "read", "operate")}
    with TestClient(make_app()) as client:
        for headers in (reader, trigger):
            for action in ("approve", "reject"):
                refused = client.post(f"/api/v1/runs/{run.id}/{action}", json={"reason": REASON}, headers=headers)
                assert refused.status_code == 403 and error_code(refused) == "forbidden"
                assert "'operate'" in refused.json()["error"]["message"]
        assert client.post(f"/api/v1/runs/{run.id}/reject", json={"reason": "x" * 10}).status_code == 401
        done = client.post(f"/api/v1/runs/{run.id}/reject", json={"reason": REASON}, headers=operator)
        assert done.status_code == 200 and done.json()["decision"]["outcome"]["approval"]["actor"] == "alice"


def test_approval_rechecks_the_hold_and_the_champion(
    client: TestClient, sessions: sessionmaker[Session], run: e.Run
) -> None:
    """Fail closed at the moment of approval: a freeze ends the run skipped, a champion that moved
    since the evaluation ends it rejected (stale evidence); neither moves the champion."""
    frozen_run = run
    with transaction(sessions) as session:
        repo.set_freeze(session, PIPELINE, datetime.now(UTC) + timedelta(hours=1))
    frozen = client.post(f"/api/v1/runs/{frozen_run.id}/approve", json={"reason": REASON})
    assert frozen.status_code == 200 and frozen.json()["status"] == "skipped"
    assert "promotions are frozen until" in frozen.json()["decision"]["outcome"]["reason"]
    assert champion(sessions) is None
    with transaction(sessions) as session:
        repo.set_freeze(session, PIPELINE, None)

    stale_run = new_waiting_run(sessions)
    with transaction(sessions) as session:  # someone force-promotes another version meanwhile
        other = repo.register_model_version(
            session, PIPELINE, artifact_uri="file:///tmp/m/x", sha256="e" * 64, size_bytes=1, metrics={}
        )
        repo.move_champion(session, PIPELINE, other.id, expected_from_version_id=None, actor="bob", reason="hotfix")
    stale = client.post(f"/api/v1/runs/{stale_run.id}/approve", json={"reason": REASON})
    assert stale.status_code == 200 and stale.json()["status"] == "rejected"
    assert "champion changed while this run waited for approval" in stale.json()["decision"]["outcome"]["reason"]
    now = champion(sessions)
    assert now is not None and now.id == other.id


def test_the_schema_describes_both_routes(app: FastAPI) -> None:
    paths = app.openapi()["paths"]
    for action in ("approve", "reject"):
        operation = paths[f"/api/v1/runs/{{run_id}}/{action}"]["post"]
        assert {"200", "400", "403", "404", "409"} <= set(operation["responses"])
        body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        reason = app.openapi()["components"]["schemas"][body]["properties"]["reason"]
        assert reason["minLength"] == 10
