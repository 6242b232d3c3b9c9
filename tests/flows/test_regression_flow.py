"""The example regression pipeline (pipelines/examples/diabetes-regression.yaml) through the real flow:
a first model promoted on its absolute RMSE, an underfit candidate rejected by the paired RMSE gate,
a data drop with shuffled targets rejected by the RMSE floor, and the champion's package predicting
in the target's own units."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from sqlalchemy.orm import Session, sessionmaker

from flows.pipeline import run_pipeline
from flows.records import decision_record
from ml.package import load_package, target_standardizer_of
from storage import repositories as repo
from storage.artifacts.local import path_from_file_uri
from storage.db import transaction
from tests.flows.conftest import event_run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NAME = "diabetes-regression"


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ml.demo_regression import diabetes_versions

    return diabetes_versions(tmp_path_factory.mktemp("diabetes"))


def example(**hyperparameters: Any) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "pipelines/examples/diabetes-regression.yaml").read_text())
    document["hardware"] = {"device": "cpu"}
    document["evaluation"] = {"latency_budget_seconds": 0.2}
    document["hyperparameters"].update(hyperparameters)
    return document


def run(sessions: sessionmaker[Session], document: dict[str, Any], version: str, uri: Path) -> dict[str, Any]:
    run_id = event_run(sessions, document, version, uri)
    run_pipeline(NAME, run_id)
    with transaction(sessions) as session:
        return decision_record(session, run_id)


def test_promoted_on_rmse_then_a_candidate_on_shuffled_targets_is_rejected(
    env: sessionmaker[Session], diabetes: dict[str, Path]
) -> None:
    first = run(env, example(epochs=40), "v1", diabetes["v1"])
    assert first["status"] == "promoted", json.dumps(first["decision"]["gate"])
    metrics = first["decision"]["candidate"]["metrics"]
    assert metrics["rmse"] < 70 and metrics["mae"] < metrics["rmse"] and 0 < metrics["r2"] < 1
    floor = next(g for g in first["decision"]["gate"] if g["check"] == "max")
    assert floor["metric"] == "rmse" and floor["verdict"] == "pass"

    with transaction(env) as session:
        champion = repo.get_champion(session, NAME)
    assert champion is not None and champion.manifest["task"] == "regression"
    assert champion.manifest["outputs"] == 1 and champion.manifest["target_names"] == ["progression"]
    assert len(champion.manifest["prediction_bins"]) >= 5
    model, standardizer = load_package(path_from_file_uri(champion.artifact_uri), champion.manifest, champion.sha256)
    scaler = target_standardizer_of(champion.manifest)
    assert scaler is not None
    rows = np.loadtxt(diabetes["v2"], delimiter=",", skiprows=1)[:50]
    with torch.inference_mode():
        outputs = model(torch.from_numpy(standardizer.transform(rows[:, :10])))
    predictions = scaler.inverse(outputs.numpy())[:, 0]
    # in score points (25..346), not standardised units: the mean prediction is near the mean target
    assert 100 < predictions.mean() < 200
    assert np.sqrt(np.mean((predictions - rows[:, 10]) ** 2)) < 75

    # the same (good) data, an underfit model: worse than the champion on the same rows, by the paired interval
    worse = run(env, example(epochs=1, learning_rate=0.0005), "v2", diabetes["v2"])
    assert worse["status"] == "rejected", worse["decision"]["outcome"]
    paired = next(g for g in worse["decision"]["gate"] if g["check"] == "vs_champion")
    assert paired["metric"] == "rmse" and paired["verdict"] == "fail", paired
    comparison = worse["decision"]["comparisons"]["rmse"]
    assert comparison["higher_is_better"] is False and comparison["ci_low"] > 0  # candidate's RMSE is higher
    assert worse["decision"]["disagreement"]["rate"] > 0

    # a broken data drop (targets shuffled among patients): no model beats the absolute floor on it
    broken = run(env, example(epochs=40), "v3", diabetes["v3"])
    assert broken["status"] == "rejected", broken["decision"]["outcome"]
    floor = next(g for g in broken["decision"]["gate"] if g["check"] == "max")
    assert floor["metric"] == "rmse" and floor["verdict"] == "fail", floor
    with transaction(env) as session:
        assert repo.get_champion(session, NAME).version == 1  # type: ignore[union-attr]
