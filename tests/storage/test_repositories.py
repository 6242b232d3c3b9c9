"""Repository behaviour, run on SQLite and PostgreSQL (the `sessions` fixture)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import ConflictError, InvalidInputError, NotFoundError, RetrainerError
from storage import repositories as repo
from storage.db import transaction
from storage.orm import SqlApiKey

T = TypeVar("T")
SPEC = {"name": "digits-classifier", "dataset": "digits", "model": {"architecture": "mlp"}}
SHA_A = "a" * 64
SHA_B = "b" * 64


def tx(sessions: sessionmaker[Session], fn: Callable[[Session], T]) -> T:
    with transaction(sessions) as session:
        return fn(session)


@pytest.fixture
def pipeline(sessions: sessionmaker[Session]) -> e.Pipeline:
    return tx(sessions, lambda s: repo.upsert_pipeline(s, "digits-classifier", "digits", SPEC))


def race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Runs fn(i) in n threads released together; returns results or raised exceptions."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # collected and asserted by the caller
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def register(sessions: sessionmaker[Session], sha: str = SHA_A, run_id: str | None = None) -> e.ModelVersion:
    return tx(
        sessions,
        lambda s: repo.register_model_version(
            s,
            "digits-classifier",
            artifact_uri=f"file:///m/{sha[:4]}.pt",
            sha256=sha,
            size_bytes=10,
            metrics={"accuracy": 0.91},
            run_id=run_id,
        ),
    )


# ------------------------------------------------------------------------------ pipelines


def test_pipeline_upsert_and_lookup(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    assert pipeline.name == "digits-classifier" and pipeline.champion_version_id is None
    assert pipeline.created_at.tzinfo is not None
    updated = tx(sessions, lambda s: repo.upsert_pipeline(s, "digits-classifier", "digits", {**SPEC, "x": 1}))
    assert updated.id == pipeline.id and updated.spec_sha256 != pipeline.spec_sha256
    assert [p.name for p in tx(sessions, repo.list_pipelines)] == ["digits-classifier"]
    assert [p.name for p in tx(sessions, lambda s: repo.pipelines_for_dataset(s, "digits"))] == ["digits-classifier"]


def test_unknown_pipeline_names_the_known_ones(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    with pytest.raises(NotFoundError) as info:
        tx(sessions, lambda s: repo.get_pipeline(s, "nope"))
    assert info.value.code == "not_found"
    assert "'nope'" in str(info.value) and "digits-classifier" in str(info.value)


def test_freeze_window_roundtrips_as_aware_utc(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    until = datetime(2030, 1, 1, 12, tzinfo=UTC)
    frozen = tx(sessions, lambda s: repo.set_freeze(s, "digits-classifier", until))
    assert frozen.frozen_until == until
    assert tx(sessions, lambda s: repo.get_pipeline(s, "digits-classifier")).frozen_until == until


# ------------------------------------------------------------------------------- datasets


def test_dataset_version_is_idempotent_and_immutable(sessions: sessionmaker[Session]) -> None:
    first = tx(sessions, lambda s: repo.record_dataset_version(s, "digits", "v1", "s3://d/v1.csv", rows=10))
    again = tx(sessions, lambda s: repo.record_dataset_version(s, "digits", "v1", "s3://d/v1.csv", rows=10))
    assert again.id == first.id
    with pytest.raises(ConflictError) as info:
        tx(sessions, lambda s: repo.record_dataset_version(s, "digits", "v1", "s3://d/OTHER.csv"))
    assert info.value.code == "conflict" and "new version" in str(info.value)
    tx(sessions, lambda s: repo.record_dataset_version(s, "digits", "v2", "s3://d/v2.csv"))
    latest = tx(sessions, lambda s: repo.latest_dataset_version(s, "digits"))
    assert latest is not None and latest.version == "v2"
    assert tx(sessions, lambda s: repo.latest_dataset_version(s, "other")) is None


# ---------------------------------------------------------------------------------- inbox


def _inbox(session: Session, event_id: str, offset: int = 0) -> tuple[e.InboxEvent, bool]:
    return repo.add_to_inbox(
        session,
        event_id=event_id,
        source="//warehouse/etl",
        type="retrainer.data.changed",
        dataset="digits",
        payload={"dataset": "digits", "uri": "s3://d/v1.csv"},
        topic="retrainer.data-changes",
        partition=1,
        offset=offset,
    )


def test_inbox_stores_each_event_id_once(sessions: sessionmaker[Session]) -> None:
    event, created = tx(sessions, lambda s: _inbox(s, "evt-1", offset=5))
    assert created and event.status is e.EventStatus.RECEIVED and (event.partition, event.offset) == (1, 5)
    again, created_again = tx(sessions, lambda s: _inbox(s, "evt-1", offset=9))
    assert not created_again and again.id == event.id and again.offset == 5
    assert [ev.event_id for ev in tx(sessions, lambda s: repo.pending_events(s, "digits"))] == ["evt-1"]


def test_inbox_concurrent_redelivery_has_one_effect(sessions: sessionmaker[Session]) -> None:
    results = race(8, lambda i: tx(sessions, lambda s: _inbox(s, "evt-race", offset=i)))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(created for _, created in results) == 1
    assert len({event.id for event, _ in results}) == 1


# ----------------------------------------------------------------------------------- runs


def test_run_lifecycle_and_event_links(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    tx(sessions, lambda s: _inbox(s, "evt-a"))
    tx(sessions, lambda s: _inbox(s, "evt-b"))
    run, created = tx(
        sessions,
        lambda s: repo.create_run(
            s, "digits-classifier", e.TriggerKind.EVENT, dedupe_key="w1", event_ids=["evt-a", "evt-b"]
        ),
    )
    assert created and run.status is e.RunStatus.QUEUED and run.event_ids == ("evt-a", "evt-b")
    assert tx(sessions, lambda s: repo.get_event(s, "evt-a")).status is e.EventStatus.LINKED
    running = tx(sessions, lambda s: repo.update_run(s, run.id, status=e.RunStatus.RUNNING, prefect_flow_run_id="f"))
    assert running.started_at is not None and running.finished_at is None
    done = tx(sessions, lambda s: repo.update_run(s, run.id, status=e.RunStatus.REJECTED))
    assert done.finished_at is not None and done.finished_at >= running.started_at  # type: ignore[operator]
    with pytest.raises(ConflictError):
        tx(sessions, lambda s: repo.update_run(s, run.id, status=e.RunStatus.RUNNING))
    assert tx(sessions, lambda s: repo.get_run(s, run.id)).status is e.RunStatus.REJECTED


def test_run_dedupe_key_gives_one_run_per_window(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    first, c1 = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.EVENT, dedupe_key="w"))
    second, c2 = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.EVENT, dedupe_key="w"))
    assert (c1, c2) == (True, False) and first.id == second.id


def test_idempotency_key_same_body_same_run_other_body_conflict(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    def create(body_sha: str) -> tuple[e.Run, bool]:
        return tx(
            sessions,
            lambda s: repo.create_run(
                s, "digits-classifier", e.TriggerKind.MANUAL, idempotency_key="k1", request_sha256=body_sha
            ),
        )

    first, created = create(SHA_A)
    again, created_again = create(SHA_A)
    assert created and not created_again and again.id == first.id
    with pytest.raises(ConflictError) as info:
        create(SHA_B)
    assert info.value.code == "conflict" and "Idempotency-Key" in str(info.value)


def test_concurrent_identical_requests_create_exactly_one_run(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    results = race(
        10,
        lambda i: tx(
            sessions,
            lambda s: repo.create_run(
                s, "digits-classifier", e.TriggerKind.MANUAL, idempotency_key="same", request_sha256=SHA_A
            ),
        ),
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(created for _, created in results) == 1
    assert len({run.id for run, _ in results}) == 1


def test_list_runs_newest_first_with_limit(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    ids = [
        tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.SCHEDULE))[0].id for _ in range(3)
    ]
    listed = tx(sessions, lambda s: repo.list_runs(s, "digits-classifier", limit=2))
    assert [r.id for r in listed] == [ids[2], ids[1]]
    with pytest.raises(InvalidInputError) as info:
        tx(sessions, lambda s: repo.list_runs(s, limit=0))
    assert info.value.code == "invalid_input"


# -------------------------------------------------------------------- models and champion


def test_model_versions_number_up_and_validate_digest(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    assert [register(sessions, SHA_A).version, register(sessions, SHA_B).version] == [1, 2]
    assert [v.version for v in tx(sessions, lambda s: repo.list_model_versions(s, "digits-classifier"))] == [2, 1]
    with pytest.raises(InvalidInputError):
        register(sessions, "not-a-digest")


def test_concurrent_registrations_take_distinct_versions(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    results = race(4, lambda i: register(sessions, f"{i:064x}"))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r.version for r in results) == [1, 2, 3, 4]


def test_champion_alias_moves_with_history_and_retires_the_old(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    v1, v2 = register(sessions, SHA_A), register(sessions, SHA_B)
    with pytest.raises(InvalidInputError):
        tx(sessions, lambda s: repo.set_model_stage(s, v1.id, e.ModelStage.CHAMPION))
    tx(
        sessions,
        lambda s: repo.move_champion(
            s,
            "digits-classifier",
            v1.id,
            expected_from_version_id=None,
            actor="gate",
            reason="first model: absolute gates passed",
        ),
    )
    tx(
        sessions,
        lambda s: repo.move_champion(
            s,
            "digits-classifier",
            v2.id,
            expected_from_version_id=v1.id,
            actor="canary",
            reason="all canary steps passed",
        ),
    )
    champion = tx(sessions, lambda s: repo.get_champion(s, "digits-classifier"))
    assert champion is not None and champion.id == v2.id and champion.stage is e.ModelStage.CHAMPION
    assert tx(sessions, lambda s: repo.get_model_version(s, "digits-classifier", 1)).stage is e.ModelStage.RETIRED
    history = tx(sessions, lambda s: repo.alias_history(s, "digits-classifier"))
    assert [(h.from_version_id, h.to_version_id, h.actor) for h in history] == [
        (v1.id, v2.id, "canary"),
        (None, v1.id, "gate"),
    ]


def test_stale_champion_move_is_refused_and_leaves_no_trace(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    v1, v2 = register(sessions, SHA_A), register(sessions, SHA_B)
    tx(
        sessions,
        lambda s: repo.move_champion(
            s, "digits-classifier", v1.id, expected_from_version_id=None, actor="gate", reason="first"
        ),
    )
    with pytest.raises(ConflictError) as info:
        tx(
            sessions,
            lambda s: repo.move_champion(
                s, "digits-classifier", v2.id, expected_from_version_id=None, actor="gate", reason="stale view"
            ),
        )
    assert "moved concurrently" in str(info.value)
    assert len(tx(sessions, lambda s: repo.alias_history(s, "digits-classifier"))) == 1
    assert tx(sessions, lambda s: repo.get_model_version(s, "digits-classifier", 2)).stage is e.ModelStage.CANDIDATE


def test_two_racing_promotions_never_both_win(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    versions = [register(sessions, f"{i:064x}") for i in range(4)]
    results = race(
        4,
        lambda i: tx(
            sessions,
            lambda s: repo.move_champion(
                s,
                "digits-classifier",
                versions[i].id,
                expected_from_version_id=None,
                actor=f"worker-{i}",
                reason="race",
            ),
        ),
    )
    winners = [r for r in results if isinstance(r, e.AliasMove)]
    losers = [r for r in results if isinstance(r, RetrainerError)]
    assert len(winners) == 1 and len(losers) == 3, results
    assert all(isinstance(r, ConflictError) for r in losers)
    champion = tx(sessions, lambda s: repo.get_champion(s, "digits-classifier"))
    assert champion is not None and champion.id == winners[0].to_version_id


# ---------------------------------------------------------------------- gate and rollouts


def test_gate_checks_roundtrip(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    checks = [
        e.GateCheck("accuracy", "min", e.Verdict.PASS, "0.95 >= 0.90", candidate_value=0.95, threshold=0.9),
        e.GateCheck(
            "accuracy",
            "vs_champion",
            e.Verdict.FAIL,
            "CI lower bound -0.01 < 0.0",
            candidate_value=0.95,
            champion_value=0.96,
            ci_low=-0.01,
            ci_high=0.002,
        ),
    ]
    tx(sessions, lambda s: repo.record_gate_checks(s, run.id, checks))
    stored = tx(sessions, lambda s: repo.gate_verdicts(s, run.id))
    assert [(v.metric, v.check, v.verdict, v.ci_low) for v in stored] == [
        ("accuracy", "min", e.Verdict.PASS, None),
        ("accuracy", "vs_champion", e.Verdict.FAIL, -0.01),
    ]


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


# ------------------------------------------------------------------------------ api keys


def test_api_keys_are_stored_hashed_and_verified(sessions: sessionmaker[Session]) -> None:
    key, plaintext = tx(sessions, lambda s: repo.create_api_key(s, "ci-bot"))
    stored = tx(sessions, lambda s: s.scalars(select(SqlApiKey)).one().key_sha256)
    assert plaintext not in stored and len(stored) == 64
    ok = tx(sessions, lambda s: repo.authenticate_api_key(s, plaintext))
    assert ok is not None and ok.name == "ci-bot" and ok.last_used_at is not None
    assert tx(sessions, lambda s: repo.authenticate_api_key(s, plaintext[:-1] + "x")) is None
    assert tx(sessions, lambda s: repo.authenticate_api_key(s, "garbage")) is None
    with pytest.raises(ConflictError):
        tx(sessions, lambda s: repo.create_api_key(s, "ci-bot"))
    tx(sessions, lambda s: repo.revoke_api_key(s, "ci-bot"))
    assert tx(sessions, lambda s: repo.authenticate_api_key(s, plaintext)) is None
    assert key.revoked_at is None


def test_timestamps_are_aware_utc(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    stored = tx(sessions, lambda s: repo.get_run(s, run.id))
    assert stored.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stored.created_at) < timedelta(minutes=1)


def _new(event_id: str) -> repo.NewInboxEvent:
    return repo.NewInboxEvent(
        event_id=event_id,
        source="//t",
        type="retrainer.data.changed",
        dataset="digits",
        payload={"data": {"dataset": "digits", "uri": "s3://d/x.csv"}},
        topic="t",
        partition=0,
        offset=1,
    )


def test_batch_inbox_insert_counts_new_and_redelivered(sessions: sessionmaker[Session]) -> None:
    tx(sessions, lambda s: _inbox(s, "b-0"))
    stored, duplicates = tx(
        sessions, lambda s: repo.add_many_to_inbox(s, [_new("b-0"), _new("b-1"), _new("b-2"), _new("b-1")])
    )
    assert (stored, duplicates) == (2, 2)
    assert {ev.event_id for ev in tx(sessions, lambda s: repo.pending_events(s, "digits"))} == {"b-0", "b-1", "b-2"}


def test_racing_batch_inserts_store_each_event_once(sessions: sessionmaker[Session]) -> None:
    batches = [[_new(f"r-{j}") for j in range(i * 10, i * 10 + 30)] for i in range(4)]  # overlapping ids
    results = race(4, lambda i: tx(sessions, lambda s: repo.add_many_to_inbox(s, batches[i])))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(stored for stored, _ in results) == 60
    assert len(tx(sessions, lambda s: repo.pending_events(s, "digits"))) == 60


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
