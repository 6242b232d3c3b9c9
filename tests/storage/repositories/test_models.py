"""Model versions and the champion alias, on SQLite and PostgreSQL (the `sessions` fixture)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import ConflictError, InvalidInputError, RetrainerError
from storage import repositories as repo
from tests.storage.repositories.conftest import SHA_A, SHA_B, race, register, tx


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


def test_alias_moves_of_a_run_are_its_own_oldest_first(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    v1, v2 = register(sessions, SHA_A), register(sessions, SHA_B, run_id=run.id)

    def move(to: int, expected: int | None, run_id: str | None, actor: str) -> None:
        tx(
            sessions,
            lambda s: repo.move_champion(
                s, "digits-classifier", to, expected_from_version_id=expected, actor=actor, reason="r", run_id=run_id
            ),
        )

    move(v1.id, None, None, "ops")
    move(v2.id, v1.id, run.id, "gate")
    move(v1.id, v2.id, run.id, "canary")
    moves = tx(sessions, lambda s: repo.alias_moves_of_run(s, run.id))
    assert [(m.actor, m.from_version_id, m.to_version_id) for m in moves] == [
        ("gate", v1.id, v2.id),
        ("canary", v2.id, v1.id),
    ]
    assert tx(sessions, lambda s: repo.alias_moves_of_run(s, "no-such-run")) == []


def test_a_registered_version_keeps_its_artifact_and_manifest(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    manifest = {"architecture": "mlp", "variant": "dynamic-int8"}
    version = tx(
        sessions,
        lambda s: repo.register_model_version(
            s,
            "digits-classifier",
            artifact_uri="s3://m/v1.safetensors",
            sha256=SHA_A,
            size_bytes=123,
            metrics={"accuracy": 0.9},
            manifest=manifest,
            stage=e.ModelStage.REJECTED,
        ),
    )
    stored = tx(sessions, lambda s: repo.get_model_version_by_id(s, version.id))
    assert (stored.artifact_uri, stored.sha256, stored.size_bytes) == ("s3://m/v1.safetensors", SHA_A, 123)
    assert (stored.manifest, stored.metrics, stored.stage, stored.run_id) == (
        manifest,
        {"accuracy": 0.9},
        e.ModelStage.REJECTED,
        None,
    )
