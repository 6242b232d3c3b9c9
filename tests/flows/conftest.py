"""A real Prefect (its test harness: a temporary local server) and a fresh metadata DB and artifact
folder per test; the digits versions as file:// data."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction

BASE_SPEC: dict[str, Any] = {
    "name": "digits-classifier",
    "dataset": "digits",
    "data": {"format": "csv", "target": "label", "validation_fraction": 0.15, "test_fraction": 0.2, "seed": 7},
    "model": {
        "architecture": "mlp",
        "params": {"hidden_sizes": [64], "dropout": 0.0},
        "input_shape": [64],
        "output_classes": 10,
    },
    "hyperparameters": {
        "optimizer": "adamw",
        "learning_rate": 0.003,
        "batch_size": 64,
        "epochs": 6,
        "checkpoint_every_steps": 5,
    },
    "hardware": {"device": "cpu"},
    "quantization": {"type": "dynamic", "max_accuracy_drop": 0.01},
    "evaluation": {"latency_budget_seconds": 0.2},
    "gates": {"min": {"accuracy": 0.5}, "vs_champion": {"accuracy": {"min_delta": 0.0, "confidence": 0.95}}},
}
WEAK = {"epochs": 1}


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ml.demo_data import digits_versions

    return digits_versions(tmp_path_factory.mktemp("digits"))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_server: None) -> sessionmaker[Session]:
    """Embedded defaults in a temporary folder; tests that need PostgreSQL/MinIO override them."""
    url = f"sqlite:///{tmp_path / 'retrainer.db'}"
    monkeypatch.setenv("RETRAINER_DATABASE_URL", url)
    monkeypatch.setenv("RETRAINER_ARTIFACT_ROOT", f"file://{tmp_path / 'artifacts'}")
    monkeypatch.setenv("RETRAINER_HOME_DIR", str(tmp_path / "home"))
    migrations.upgrade(url)
    return make_sessions(create_db_engine(url))


def spec(**hyperparameters: Any) -> dict[str, Any]:
    document = copy.deepcopy(BASE_SPEC)
    document["hyperparameters"].update(hyperparameters)
    return document


def event_run(sessions: sessionmaker[Session], document: dict[str, Any], version: str, uri: Path | str) -> str:
    """What the trigger service will do: register the spec, store the event, create the run.
    `uri`: a local file, or the dataset's s3:// URI."""
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, document["name"], document["dataset"], document)
        event_id = f"evt-{uuid.uuid4()}"
        repo.add_to_inbox(
            session,
            event_id=event_id,
            source="//tests",
            type="retrainer.data.changed",
            dataset=document["dataset"],
            payload={
                "data": {
                    "dataset": document["dataset"],
                    "version": version,
                    "uri": f"file://{uri}" if isinstance(uri, Path) else uri,
                }
            },
        )
        run, _ = repo.create_run(session, document["name"], e.TriggerKind.EVENT, event_ids=[event_id])
    return run.id
