"""Approval gates on the real pipeline flow (a real Prefect, tiny data): a candidate that passes waits
as awaiting_approval with the champion untouched and its flow run ended; approve promotes it or
starts its canary, reject and the timeout end it rejected, and a newer candidate supersedes it."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from flows import approvals
from flows.canary import RolloutSupervisor
from flows.pipeline import run_pipeline
from flows.records import decision_record
from storage import repositories as repo
from storage.db import transaction
from tests.flows.conftest import WEAK, event_run, spec

pytestmark = pytest.mark.integration

PIPELINE = "digits-classifier"
REASON = "looked at the gate verdicts, fine to ship"


def gated(timeout_seconds: float = 3600, **hyperparameters: Any) -> dict[str, Any]:
    document = spec(**hyperparameters)
    document["promotion"] = {"approval": {"required": True, "timeout_seconds": timeout_seconds}}
    return document


def run(sessions: sessionmaker[Session], document: dict[str, Any], version: str, uri: Path) -> dict[str, Any]:
    run_id = event_run(sessions, document, version, uri)
    outcome = run_pipeline(PIPELINE, run_id)  # returns: the flow run does not wait for the approval
    record = read(sessions, run_id)
    assert outcome["status"] == record["status"]
    return record


def read(sessions: sessionmaker[Session], run_id: str) -> dict[str, Any]:
    with transaction(sessions) as session:
        return decision_record(session, run_id)


def champion(sessions: sessionmaker[Session]) -> e.ModelVersion | None:
    with transaction(sessions) as session:
        return repo.get_champion(session, PIPELINE)


def stage(sessions: sessionmaker[Session], version: int) -> e.ModelStage:
    with transaction(sessions) as session:
        return repo.get_model_version(session, PIPELINE, version).stage


def test_a_passing_candidate_waits_then_reject_and_approve(env: sessionmaker[Session], digits: dict[str, Path]) -> None:
    first = run(env, gated(**WEAK), "v1", digits["v1"])
    assert first["status"] == "awaiting_approval", first["decision"]["outcome"]
    waiting = first["decision"]["outcome"]
    assert waiting["reason"].startswith("gate passed; awaiting approval until")
    assert waiting["approval"]["timeout_seconds"] == 3600 and first["finished_at"] is None
    assert champion(env) is None and stage(env, 1) is e.ModelStage.AWAITING_APPROVAL

    with transaction(env) as session:
        rejected = approvals.reject(session, first["run_id"], actor="carol", reason="the v1 data is a partial export")
    assert rejected.status is e.RunStatus.REJECTED and rejected.finished_at is not None
    assert read(env, first["run_id"])["decision"]["outcome"]["approval"]["actor"] == "carol"
    assert champion(env) is None and stage(env, 1) is e.ModelStage.REJECTED

    second = run(env, gated(**WEAK), "v2", digits["v2"])
    assert second["status"] == "awaiting_approval" and champion(env) is None
    with transaction(env) as session:
        approved = approvals.approve(session, second["run_id"], actor="alice", reason=REASON)
    assert approved.status is e.RunStatus.PROMOTED
    record = read(env, second["run_id"])
    assert record["decision"]["outcome"]["approval"]["decision"] == "approved"
    assert [(m["actor"], m["reason"]) for m in record["decision"]["alias_moves"]] == [("alice", REASON)]
    now = champion(env)
    assert now is not None and now.version == 2


def test_approval_starts_the_canary_rollout(env: sessionmaker[Session], digits: dict[str, Path]) -> None:
    assert run(env, spec(**WEAK), "v1", digits["v1"])["status"] == "promoted"  # no approval asked
    document = gated()
    document["canary"] = {"steps": [50, 100], "interval_seconds": 1, "min_requests": 20}
    second = run(env, document, "v2", digits["v2"])
    assert second["status"] == "awaiting_approval", second["decision"]["outcome"]
    with transaction(env) as session:
        assert repo.active_rollout(session, PIPELINE) is None  # nothing rolls out while it waits

    with transaction(env) as session:
        approved = approvals.approve(session, second["run_id"], actor="alice", reason=REASON)
        rollout = repo.active_rollout(session, PIPELINE)
    assert approved.status is e.RunStatus.CANARY
    assert rollout is not None and rollout.run_id == second["run_id"]
    assert stage(env, 2) is e.ModelStage.CANARY
    now = champion(env)
    assert now is not None and now.version == 1  # the canary decides the promotion, not the approval
    assert read(env, second["run_id"])["decision"]["outcome"]["reason"].startswith("approved by alice; canary rollout")


def test_a_newer_candidate_supersedes_and_the_timeout_rejects(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    first = run(env, gated(**WEAK), "v1", digits["v1"])
    assert first["status"] == "awaiting_approval"
    second = run(env, gated(timeout_seconds=1, **WEAK), "v2", digits["v2"])
    assert second["status"] == "awaiting_approval"
    superseded = read(env, first["run_id"])
    assert superseded["status"] == "rejected" and stage(env, 1) is e.ModelStage.REJECTED
    assert superseded["decision"]["outcome"]["reason"] == f"superseded by run {second['run_id']}"
    assert superseded["decision"]["outcome"]["approval"]["decision"] == "superseded"

    deadline = datetime.fromisoformat(second["decision"]["outcome"]["approval"]["deadline"])
    time.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()) + 0.05)
    supervisor = RolloutSupervisor(env, serving_url=None)
    assert supervisor.run_once() == []  # its pass rejects the overdue run; no rollout to control
    expired = read(env, second["run_id"])
    assert expired["status"] == "rejected", expired["decision"]["outcome"]
    assert "no approval by the deadline" in expired["decision"]["outcome"]["reason"]
    assert expired["decision"]["outcome"]["approval"]["actor"] == approvals.TIMEOUT_ACTOR
    assert champion(env) is None and stage(env, 2) is e.ModelStage.REJECTED
    # later passes find nothing left to expire
    assert approvals.expire_overdue_approvals(env, now=datetime.now(UTC) + timedelta(days=2)) == []
