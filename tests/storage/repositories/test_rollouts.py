"""Rollouts and their steps, on SQLite and PostgreSQL (the `sessions` fixture)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import ConflictError
from storage import repositories as repo
from tests.storage.repositories.conftest import SHA_A, SHA_B, race, register, tx


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
            s, rollout.id, step_index=0, traffic_percent=10, verdict=e.Verdict.PASS, analysis={"error_rate": 0.0}
        ),
    )
    with pytest.raises(ConflictError):
        tx(
            sessions,
            lambda s: repo.record_rollout_step(
                s, rollout.id, step_index=0, traffic_percent=10, verdict=e.Verdict.PASS, analysis={}
            ),
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

    repeated = tx(sessions, lambda s: repo.record_step_attempt(s, rollout.id, 0, {"action": "repeat", "reason": "r"}))
    assert repeated.finished_at is None and repeated.started_at >= opened.started_at  # a fresh window
    done = tx(
        sessions,
        lambda s: repo.record_step_attempt(
            s, rollout.id, 0, {"action": "advance", "reason": "ok"}, verdict=e.Verdict.PASS, next_step=1
        ),
    )
    assert done.verdict is e.Verdict.PASS and [a["action"] for a in done.analysis["attempts"]] == ["repeat", "advance"]
    with pytest.raises(ConflictError):  # step 0 is over: it cannot be decided twice
        tx(
            sessions,
            lambda s: repo.record_step_attempt(s, rollout.id, 0, {"action": "advance"}, verdict=e.Verdict.PASS),
        )
    tx(sessions, lambda s: repo.begin_rollout_step(s, rollout.id, traffic_percent=100))
    ended = tx(sessions, lambda s: repo.finish_rollout(s, rollout.id, e.RolloutStatus.ABORTED, "aborted by ops"))
    assert ended.steps[-1].finished_at is not None and ended.steps[-1].analysis["reason"] == "aborted by ops"
    with pytest.raises(ConflictError):
        tx(sessions, lambda s: repo.begin_rollout_step(s, rollout.id, traffic_percent=100))
