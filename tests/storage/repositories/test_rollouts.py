"""Rollouts and their steps, on SQLite and PostgreSQL (the `sessions` fixture)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import ConflictError, InfrastructureError
from domain.evidence import CanaryAction, CanaryAttempt, StepAnalysis, VariantWindow
from storage import repositories as repo
from storage.orm import SqlRolloutStep
from tests.storage.repositories.conftest import SHA_A, SHA_B, race, register, tx


def attempt(action: CanaryAction) -> CanaryAttempt:
    return CanaryAttempt(
        action=action,
        reason=f"{action.value}: step 1",
        at=datetime(2026, 11, 23, 10, 0, 31, tzinfo=UTC),
        elapsed_seconds=31.0,
        traffic_percent=50.0,
        canary=VariantWindow(version="2", requests=250, errors=1, latency_p99_ms=3.1, class_counts={"0": 250}),
        champion=VariantWindow(version="1", requests=250, latency_p99_ms=3.0),
        checks=(e.GateCheck("error_rate", "canary", e.Verdict.PASS, "0.0040 <= 0.0100", 0.004, None, 0.01),),
    )


def test_one_active_rollout_per_pipeline_and_steps_once(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    v1, v2 = register(sessions, SHA_A), register(sessions, SHA_B)
    policy = {"steps": [10, 50, 100]}

    def start() -> e.Rollout:
        return tx(
            sessions,
            lambda s: repo.start_rollout(
                s, "digits-classifier", candidate_version_id=v2.id, champion_version_id=v1.id, policy=policy
            ),
        )

    rollout = start()
    with pytest.raises(ConflictError) as info:
        start()
    assert "already has an active rollout" in str(info.value)
    tx(
        sessions,
        lambda s: repo.record_rollout_step(
            s, rollout.id, step_index=0, traffic_percent=10, verdict=e.Verdict.PASS, analysis=StepAnalysis()
        ),
    )
    with pytest.raises(ConflictError):
        tx(
            sessions,
            lambda s: repo.record_rollout_step(s, rollout.id, step_index=0, traffic_percent=10, verdict=e.Verdict.PASS),
        )
    active = tx(sessions, lambda s: repo.active_rollout(s, "digits-classifier"))
    assert active is not None and active.current_step == 1 and len(active.steps) == 1
    tx(sessions, lambda s: repo.finish_rollout(s, rollout.id, e.RolloutStatus.ROLLED_BACK, "p99 ratio 3.1 > 1.2"))
    assert tx(sessions, lambda s: repo.active_rollout(s, "digits-classifier")) is None
    second = start()  # a finished rollout no longer blocks a new one
    latest = tx(sessions, lambda s: repo.latest_rollout(s, "digits-classifier"))
    assert latest is not None and latest.id == second.id


def test_concurrent_rollout_starts_admit_one(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    v1 = register(sessions, SHA_A)
    results = race(
        4,
        lambda i: tx(
            sessions,
            lambda s: repo.start_rollout(
                s, "digits-classifier", candidate_version_id=v1.id, champion_version_id=None, policy={}
            ),
        ),
    )
    assert sum(isinstance(r, e.Rollout) for r in results) == 1
    assert sum(isinstance(r, ConflictError) for r in results) == 3, results


def test_the_step_in_progress_keeps_its_window_and_advances_once(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    v1, v2 = register(sessions, SHA_A), register(sessions, SHA_B)
    rollout = tx(
        sessions,
        lambda s: repo.start_rollout(
            s, "digits-classifier", candidate_version_id=v2.id, champion_version_id=v1.id, policy={"steps": [50, 100]}
        ),
    )
    opened = tx(sessions, lambda s: repo.begin_rollout_step(s, rollout.id, traffic_percent=50))
    again = tx(sessions, lambda s: repo.begin_rollout_step(s, rollout.id, traffic_percent=50))  # a restarted controller
    assert (again.id, again.started_at) == (opened.id, opened.started_at)

    repeated = tx(sessions, lambda s: repo.record_step_attempt(s, rollout.id, 0, attempt(CanaryAction.REPEAT)))
    assert repeated.finished_at is None and repeated.started_at >= opened.started_at  # a fresh window
    done = tx(
        sessions,
        lambda s: repo.record_step_attempt(
            s, rollout.id, 0, attempt(CanaryAction.ADVANCE), verdict=e.Verdict.PASS, next_step=1
        ),
    )
    assert done.verdict is e.Verdict.PASS and done.analysis == StepAnalysis(
        attempts=(attempt(CanaryAction.REPEAT), attempt(CanaryAction.ADVANCE)),
        action=CanaryAction.ADVANCE,
        reason="advance: step 1",
    )
    assert done.analysis.repeats == 1 and done.analysis.decisive == attempt(CanaryAction.ADVANCE)
    with pytest.raises(ConflictError):  # step 0 is over: it cannot be decided twice
        tx(
            sessions,
            lambda s: repo.record_step_attempt(s, rollout.id, 0, attempt(CanaryAction.ADVANCE), verdict=e.Verdict.PASS),
        )
    tx(sessions, lambda s: repo.begin_rollout_step(s, rollout.id, traffic_percent=100))
    ended = tx(sessions, lambda s: repo.finish_rollout(s, rollout.id, e.RolloutStatus.ABORTED, "aborted by ops"))
    closed = ended.steps[-1]
    assert closed.finished_at is not None and closed.analysis == StepAnalysis(
        action=e.RolloutStatus.ABORTED, reason="aborted by ops"
    )
    with pytest.raises(ConflictError):
        tx(sessions, lambda s: repo.begin_rollout_step(s, rollout.id, traffic_percent=100))


def start(sessions: sessionmaker[Session]) -> e.Rollout:
    v1, v2 = register(sessions, SHA_A), register(sessions, SHA_B)
    return tx(
        sessions,
        lambda s: repo.start_rollout(
            s, "digits-classifier", candidate_version_id=v2.id, champion_version_id=v1.id, policy={"steps": [50, 100]}
        ),
    )


def test_keys_the_model_does_not_know_stay_in_the_row(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    """What revision 0003 could not parse (`unparsed`) survives a new attempt, for its downgrade."""
    rollout = start(sessions)
    opened = tx(sessions, lambda s: repo.begin_rollout_step(s, rollout.id, traffic_percent=50))
    kept = {"unparsed": [{"position": 0, "entry": "not a window"}]}
    tx(
        sessions,
        lambda s: s.execute(update(SqlRolloutStep).where(SqlRolloutStep.id == opened.id).values(analysis=kept)),
    )
    tx(sessions, lambda s: repo.record_step_attempt(s, rollout.id, 0, attempt(CanaryAction.REPEAT)))
    row = tx(sessions, lambda s: s.get_one(SqlRolloutStep, opened.id).analysis)
    assert row["unparsed"] == kept["unparsed"] and row["action"] == "repeat" and len(row["attempts"]) == 1


def test_a_stored_analysis_that_is_not_the_model_names_the_step_and_the_fix(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    rollout = start(sessions)
    opened = tx(sessions, lambda s: repo.begin_rollout_step(s, rollout.id, traffic_percent=50))
    broken = {"attempts": [{"action": "advance"}]}  # written by hand, never migrated
    tx(
        sessions,
        lambda s: s.execute(update(SqlRolloutStep).where(SqlRolloutStep.id == opened.id).values(analysis=broken)),
    )
    with pytest.raises(InfrastructureError) as info:
        tx(sessions, lambda s: repo.active_rollout(s, "digits-classifier"))
    assert info.value.code == "infrastructure_error"
    assert f"rollout {rollout.id} step 0" in info.value.message and "retrainer db upgrade" in info.value.message
