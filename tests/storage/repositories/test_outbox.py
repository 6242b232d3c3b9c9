"""The decision outbox on SQLite and PostgreSQL: each decision's event is written in its transaction
(and rolled back with it), read back unsent in order, marked sent once, with its webhook deliveries."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.decisions import DecisionType, DeliveryStatus
from domain.errors import ConflictError
from domain.evidence import CanaryAction
from storage import repositories as repo
from tests.storage.repositories.conftest import SHA_A, SHA_B, register, tx
from tests.storage.repositories.test_rollouts import attempt

PIPELINE = "digits-classifier"


def types(sessions: sessionmaker[Session]) -> list[str]:
    return [event.type.value for event in tx(sessions, lambda s: repo.outbox_events(s, PIPELINE))]


def test_a_runs_story_writes_its_events_with_each_decision(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, PIPELINE, e.TriggerKind.MANUAL, reason="because"))
    tx(sessions, lambda s: repo.update_run(s, run.id, status=e.RunStatus.RUNNING))
    version = register(sessions, SHA_A, run_id=run.id)
    checks = [
        e.GateCheck("accuracy", "min", e.Verdict.PASS, "0.91 >= 0.9"),
        e.GateCheck("overall", "overall", e.Verdict.PASS, "all checks passed"),
    ]
    tx(sessions, lambda s: repo.record_gate_checks(s, run.id, checks, model_version_id=version.id))
    outcome = {"outcome": {"reason": "gate passed", "approval": {"deadline": "2026-12-03T00:00:00+00:00"}}}
    tx(sessions, lambda s: repo.update_run(s, run.id, status=e.RunStatus.AWAITING_APPROVAL, evidence=outcome))
    decided = {"outcome": {"reason": "approved", "approval": {"decision": "approved", "actor": "ana", "reason": "ok"}}}

    def approve(session: Session) -> None:
        repo.move_champion(session, PIPELINE, version.id, expected_from_version_id=None, actor="ana", reason="ok")
        repo.update_run(session, run.id, status=e.RunStatus.PROMOTED, evidence=decided)

    tx(sessions, approve)

    assert types(sessions) == [
        DecisionType.RUN_CREATED,
        DecisionType.RUN_STARTED,
        DecisionType.GATE_DECIDED,
        DecisionType.APPROVAL_REQUESTED,
        DecisionType.MODEL_PROMOTED,
        DecisionType.APPROVAL_DECIDED,
        DecisionType.RUN_FINISHED,
    ]
    events = tx(sessions, lambda s: repo.outbox_events(s, PIPELINE))
    assert len({event.id for event in events}) == len(events)
    assert all(event.pipeline == PIPELINE for event in events)
    by_type = {event.type: event.data for event in events}
    assert by_type[DecisionType.GATE_DECIDED]["passed"] is True
    assert by_type[DecisionType.APPROVAL_REQUESTED]["deadline"] == "2026-12-03T00:00:00+00:00"
    assert by_type[DecisionType.APPROVAL_DECIDED] | {"actor": "ana"} == by_type[DecisionType.APPROVAL_DECIDED]
    assert by_type[DecisionType.RUN_FINISHED]["status"] == "promoted"
    assert by_type[DecisionType.MODEL_PROMOTED]["to_version_id"] == version.id


def test_an_event_is_rolled_back_with_its_decision(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    v1, v2 = register(sessions, SHA_A), register(sessions, SHA_B)

    def promote_then_fail(session: Session) -> None:
        repo.move_champion(session, PIPELINE, v1.id, expected_from_version_id=None, actor="gate", reason="first")
        raise RuntimeError("the flow died before its commit")

    with pytest.raises(RuntimeError):
        tx(sessions, promote_then_fail)
    assert types(sessions) == []

    def lose_the_race(session: Session) -> None:  # a savepoint's compare-and-set that fails leaves no event
        with pytest.raises(ConflictError), session.begin_nested():
            repo.move_champion(session, PIPELINE, v2.id, expected_from_version_id=v1.id, actor="gate", reason="x")

    tx(sessions, lose_the_race)
    assert types(sessions) == []


def test_rollout_decisions_and_a_manual_rollback(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    v1, v2 = register(sessions, SHA_A), register(sessions, SHA_B)
    tx(sessions, lambda s: repo.move_champion(s, PIPELINE, v1.id, expected_from_version_id=None, actor="a", reason="r"))
    rollout = tx(
        sessions,
        lambda s: repo.start_rollout(
            s, PIPELINE, candidate_version_id=v2.id, champion_version_id=v1.id, policy={"steps": [50, 100]}
        ),
    )
    tx(sessions, lambda s: repo.begin_rollout_step(s, rollout.id, traffic_percent=50))
    tx(
        sessions,
        lambda s: repo.record_step_attempt(
            s, rollout.id, 0, attempt(CanaryAction.ADVANCE), verdict=e.Verdict.PASS, next_step=1
        ),
    )
    tx(sessions, lambda s: repo.finish_rollout(s, rollout.id, e.RolloutStatus.ROLLED_BACK, "latency"))
    tx(
        sessions,
        lambda s: repo.move_champion(
            s,
            PIPELINE,
            v2.id,
            expected_from_version_id=v1.id,
            actor="ana (rollback)",
            reason="r",
            previous_stage=e.ModelStage.ROLLED_BACK,
        ),
    )
    assert types(sessions) == [
        DecisionType.MODEL_PROMOTED,
        DecisionType.ROLLOUT_STEP_DECIDED,
        DecisionType.ROLLOUT_FINISHED,
        DecisionType.CHAMPION_ROLLED_BACK,
    ]
    step = tx(sessions, lambda s: repo.outbox_events(s, PIPELINE))[1]
    assert step.data == {
        "rollout_id": rollout.id,
        "run_id": None,
        "step_index": 0,
        "traffic_percent": 50.0,
        "verdict": "pass",
        "reason": "advance: step 1",
    }


def test_unsent_in_order_marked_sent_once_with_deliveries(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    for _ in range(3):
        tx(sessions, lambda s: repo.create_run(s, PIPELINE, e.TriggerKind.MANUAL))
    unsent = tx(sessions, lambda s: repo.unsent_events(s, 2))
    assert [position for position, _ in unsent] == sorted(position for position, _ in unsent)
    first = unsent[0][0]
    tx(sessions, lambda s: repo.mark_sent(s, [p for p, _ in unsent], [(first, "https://hooks.test/a", "HOOK_SECRET")]))
    left = tx(sessions, lambda s: repo.unsent_events(s))
    assert len(left) == 1 and left[0][0] > unsent[-1][0]
    assert len(tx(sessions, lambda s: repo.outbox_events(s, sent=True))) == 2

    pending = tx(sessions, lambda s: repo.webhook_deliveries(s, DeliveryStatus.PENDING))
    assert [(d.url, d.secret_env, d.event.id) for d in pending] == [
        ("https://hooks.test/a", "HOOK_SECRET", unsent[0][1].id)
    ]
    failed = tx(
        sessions,
        lambda s: repo.finish_delivery(s, pending[0].id, delivered=False, attempts=5, response_status=500, error="500"),
    )
    assert (failed.status, failed.attempts, failed.response_status) == (DeliveryStatus.FAILED, 5, 500)
    assert tx(sessions, lambda s: repo.webhook_deliveries(s, DeliveryStatus.PENDING)) == []
