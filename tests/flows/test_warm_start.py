"""`model.init` through the real pipeline flow: a warm start from the champion, a first run with no
champion, and a URI whose digest does not match (refused before training)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file
from sqlalchemy.orm import Session, sessionmaker

from domain.errors import ArtifactIntegrityError
from domain.settings import load_settings
from flows.pipeline import CHECKPOINT_PREFIX, run_pipeline
from flows.records import decision_record
from ml.zoo import build_model
from storage import repositories as repo
from storage.artifacts import open_artifact_store
from storage.db import transaction
from tests.flows.conftest import event_run, spec

pytestmark = pytest.mark.integration


def warm(init: dict[str, Any]) -> dict[str, Any]:
    document = spec()
    document["model"]["init"] = init
    return document


def run(sessions: sessionmaker[Session], document: dict[str, Any], version: str, uri: Path) -> dict[str, Any]:
    run_id = event_run(sessions, document, version, uri)
    run_pipeline("digits-classifier", run_id)
    with transaction(sessions) as session:
        return decision_record(session, run_id)


def first_train_loss(record: dict[str, Any]) -> float:
    return float(record["decision"]["training"]["history"][0]["train_loss"])


def test_a_warm_start_begins_from_the_champions_weights_and_the_record_names_it(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    first = run(env, warm({"from": "champion"}), "v1", digits["v1"])
    assert first["status"] == "promoted"
    init = first["decision"]["training"]["init"]
    assert init["source"] == "champion" and init["champion_version"] is None and init["sha256"] is None
    assert "from scratch" in init["note"]

    scratch = run(env, spec(), "v2", digits["v2"])
    assert scratch["decision"]["training"]["init"]["source"] == "scratch"
    with transaction(env) as session:
        champion = repo.get_champion(session, "digits-classifier")
    assert champion is not None

    warmed = run(env, warm({"from": "champion"}), "v2", digits["v2"])
    init = warmed["decision"]["training"]["init"]
    assert init["source"] == "champion" and init["champion_version"] == champion.version
    assert init["sha256"] == champion.sha256 and init["missing_keys"] == [] and init["unexpected_keys"] == []
    # same rows, same seed: only the starting weights differ, and they are already good
    assert first_train_loss(warmed) < 0.5 * first_train_loss(scratch), (warmed, scratch)


def test_a_uri_whose_digest_does_not_match_fails_the_run_before_training(
    env: sessionmaker[Session], digits: dict[str, Path], tmp_path: Path
) -> None:
    weights = tmp_path / "mlp.safetensors"
    model = build_model("mlp", {"hidden_sizes": [64], "dropout": 0.0}, [64], 10)
    save_file(model.state_dict(), str(weights))
    assert hashlib.sha256(weights.read_bytes()).hexdigest() != "0" * 64
    run_id = event_run(env, warm({"from": f"file://{weights}", "sha256": "0" * 64}), "v1", digits["v1"])
    with pytest.raises(ArtifactIntegrityError) as info:
        run_pipeline("digits-classifier", run_id)
    assert info.value.code == "artifact_integrity" and "model.init.sha256" in str(info.value)
    with transaction(env) as session:
        failed = repo.get_run(session, run_id)
    assert failed.status.value == "failed" and "model.init.sha256" in (failed.error or "")
    assert failed.model_version_id is None
    settings = load_settings()
    store = open_artifact_store(settings.artifact_root, settings)
    assert store.list_keys(CHECKPOINT_PREFIX.format(run_id=run_id)) == []  # no training step ran
