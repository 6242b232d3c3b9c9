"""The decision record assembled from repository reads (flows/records.py): its whole shape, on a
migrated SQLite database (no Prefect needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from domain.errors import NotFoundError
from flows.records import decision_record
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction

SHA = "c" * 64
TOPIC = "retrainer.data-changes"
DATA_CHANGED = "retrainer.data.changed"
EVIDENCE = {
    "data_split": {"train": 70, "validation": 15, "test": 15},
    "training": {"epochs": 3},
    "candidate": {"accuracy": 0.93},
    "champion": None,
    "comparisons": {},
    "disagreement": None,  # a first model: no champion to disagree with
    "quantization": {"variant": "fp32"},
    "outcome": {"status": "promoted"},
}


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'retrainer.db'}"
    migrations.upgrade(url)
    return make_sessions(create_db_engine(url))


def _promoted_run(session: Session) -> str:
    """One event-triggered run through the whole chain: data, gate, registration, promotion."""
    repo.upsert_pipeline(session, "digits-classifier", "digits", {"name": "digits-classifier"})
    payload = {"dataset": "digits", "uri": "s3://d/v1.csv"}
    event = repo.NewInboxEvent("evt-1", "//warehouse/etl", DATA_CHANGED, "digits", payload, None, TOPIC, 0, 4)
    repo.add_many_to_inbox(session, [event])
    run, _ = repo.create_run(session, "digits-classifier", e.TriggerKind.EVENT, reason="new data", event_ids=["evt-1"])
    dataset = repo.record_dataset_version(session, "digits", "v1", "s3://d/v1.csv", rows=100, sha256=SHA)
    checks = [e.GateCheck("accuracy", "min", e.Verdict.PASS, "0.93 >= 0.9", candidate_value=0.93, threshold=0.9)]
    repo.record_gate_checks(session, run.id, checks)
    version = repo.register_model_version(
        session, "digits-classifier", artifact_uri="s3://m/1", sha256=SHA, size_bytes=1, metrics={}, run_id=run.id
    )
    promotion = {"actor": "gate", "reason": "first", "run_id": run.id}
    repo.move_champion(session, "digits-classifier", version.id, expected_from_version_id=None, **promotion)
    repo.update_run(session, run.id, status=e.RunStatus.RUNNING, prefect_flow_run_id="flow-1")
    repo.update_run(
        session,
        run.id,
        status=e.RunStatus.PROMOTED,
        dataset_version_id=dataset.id,
        model_version_id=version.id,
        evidence=EVIDENCE,
    )
    return run.id


def test_the_record_carries_the_whole_chain_in_its_documented_shape(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        run_id = _promoted_run(session)
    with transaction(sessions) as session:
        record = decision_record(session, run_id)
        run = repo.get_run(session, run_id)
        [event] = repo.run_events(session, run_id)
        [move] = repo.alias_history(session, "digits-classifier")
    assert record == {
        "run_id": run_id,
        "pipeline": "digits-classifier",
        "status": "promoted",
        "trigger": {
            "kind": "event",
            "event_ids": ["evt-1"],
            "reason": "new data",
            "events": [
                {
                    "id": "evt-1",
                    "source": "//warehouse/etl",
                    "type": DATA_CHANGED,
                    "topic": TOPIC,
                    "partition": 0,
                    "offset": 4,
                    "received_at": event.received_at.isoformat(),
                }
            ],
        },
        "model_version": 1,
        "decision": {
            "dataset": {"dataset": "digits", "version": "v1", "uri": "s3://d/v1.csv", "rows": 100, "sha256": SHA},
            **{key: value for key, value in EVIDENCE.items() if key != "outcome"},
            "gate": [
                {
                    "metric": "accuracy",
                    "check": "min",
                    "verdict": "pass",
                    "candidate": 0.93,
                    "champion": None,
                    "threshold": 0.9,
                    "ci_low": None,
                    "ci_high": None,
                    "reason": "0.93 >= 0.9",
                }
            ],
            "outcome": {"status": "promoted"},
            "alias_moves": [
                {
                    "from_version_id": None,
                    "to_version_id": move.to_version_id,
                    "actor": "gate",
                    "reason": "first",
                    "moved_at": move.moved_at.isoformat(),
                }
            ],
        },
        "error": None,
        "prefect_flow_run_id": "flow-1",
        "created_at": run.created_at.isoformat(),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }
    assert record["started_at"] is not None and record["finished_at"] is not None


def test_a_queued_run_has_an_empty_decision(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, "digits-classifier", "digits", {"name": "digits-classifier"})
        run, _ = repo.create_run(session, "digits-classifier", e.TriggerKind.MANUAL)
        record = decision_record(session, run.id)
    assert record["status"] == "queued" and record["model_version"] is None
    assert record["trigger"] == {"kind": "manual", "event_ids": [], "reason": None, "events": []}
    assert record["decision"]["dataset"] is None and record["decision"]["gate"] == []
    assert record["decision"]["alias_moves"] == [] and record["decision"]["outcome"] is None
    assert (record["started_at"], record["finished_at"]) == (None, None)


def test_an_unknown_run_is_not_found(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session, pytest.raises(NotFoundError) as missing:
        decision_record(session, "no-such-run")
    assert missing.value.code == "not_found" and "no-such-run" in str(missing.value)
