"""A binary classifier gated on roc_auc against the champion, through the real pipeline flow."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain.errors import SpecError
from domain.spec import parse_spec
from flows.pipeline import run_pipeline
from flows.records import decision_record
from storage import repositories as repo
from storage.db import transaction
from tests.flows.conftest import BASE_SPEC, event_run

pytestmark = pytest.mark.integration

FEATURES = 8
GATES = {
    "min": {"roc_auc": 0.55, "pr_auc": 0.4},
    "vs_champion": {"roc_auc": {"min_delta": 0.0, "confidence": 0.95}},
}
STRONG = {"epochs": 12, "learning_rate": 0.01}
WEAK = {"epochs": 1, "learning_rate": 0.003}


def binary_spec(**hyperparameters: Any) -> dict[str, Any]:
    document = copy.deepcopy(BASE_SPEC)
    document["model"].update({"input_shape": [FEATURES], "output_classes": 2, "params": {"hidden_sizes": [16]}})
    document["hyperparameters"].update(hyperparameters)
    document["data"]["test_fraction"] = 0.3
    document["gates"] = copy.deepcopy(GATES)
    return document


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two overlapping Gaussian blobs (a Bayes-optimal ROC AUC near 0.88), class 1 the minority."""
    rng = np.random.default_rng(11)
    n = 1200
    labels = (rng.random(n) < 0.35).astype(np.int64)
    features = rng.normal(size=(n, FEATURES)) + 0.6 * labels[:, None]
    columns: dict[str, Any] = {f"f{i}": features[:, i] for i in range(FEATURES)}
    columns["label"] = labels
    path = tmp_path_factory.mktemp("blobs") / "blobs.csv"
    pacsv.write_csv(pa.table(columns), path)
    return path


def run(sessions: sessionmaker[Session], document: dict[str, Any], version: str, uri: Path) -> dict[str, Any]:
    run_id = event_run(sessions, document, version, uri)
    run_pipeline(document["name"], run_id)
    with transaction(sessions) as session:
        return decision_record(session, run_id)


def gate(record: dict[str, Any], check: str) -> dict[str, Any]:
    return next(g for g in record["decision"]["gate"] if g["metric"] == "roc_auc" and g["check"] == check)


def test_the_spec_knows_the_ranking_metrics() -> None:
    assert parse_spec(binary_spec(), source="binary.yaml").gates.vs_champion["roc_auc"].min_delta == 0.0
    document = binary_spec()
    document["gates"]["min"] = {"roc_acu": 0.9}
    with pytest.raises(SpecError) as info:
        parse_spec(document, source="binary.yaml")
    assert "gates.min.roc_acu: unknown metric (did you mean roc_auc?)" in str(info.value)


def test_binary_classifier_is_promoted_then_rejected_on_the_paired_roc_auc(
    env: sessionmaker[Session], blobs: Path
) -> None:
    first = run(env, binary_spec(**WEAK), "v1", blobs)
    assert first["status"] == "promoted", json.dumps(first["decision"]["gate"])
    assert gate(first, "vs_champion")["verdict"] == "skipped"

    better = run(env, binary_spec(**STRONG), "v2", blobs)
    check = gate(better, "vs_champion")
    assert better["status"] == "promoted", json.dumps(better["decision"]["gate"])
    assert check["verdict"] == "pass" and 0 < check["ci_low"] <= check["ci_high"]
    candidate = better["decision"]["candidate"]["metrics"]
    champion = better["decision"]["champion"]["report"]["metrics"]
    assert candidate["roc_auc"] > champion["roc_auc"] and 0.5 < candidate["pr_auc"] <= 1.0
    comparison = better["decision"]["comparisons"]["roc_auc"]
    assert comparison["higher_is_better"] is True and comparison["confidence"] == 0.95
    assert comparison["difference"] == pytest.approx(candidate["roc_auc"] - champion["roc_auc"])
    assert comparison["n_examples"] == better["decision"]["candidate"]["n_examples"] >= 300

    worse = run(env, binary_spec(**WEAK), "v2-weak", blobs)
    check = gate(worse, "vs_champion")
    assert worse["status"] == "rejected"
    assert gate(worse, "min")["verdict"] == "pass"  # rejected by the paired check, not the floor
    assert check["verdict"] == "fail" and check["ci_low"] <= check["ci_high"] < 0
    assert "roc_auc (vs_champion): improvement" in worse["decision"]["outcome"]["reason"]
    with transaction(env) as session:
        champion_now = repo.get_champion(session, "digits-classifier")
    assert champion_now is not None and champion_now.version == 2
