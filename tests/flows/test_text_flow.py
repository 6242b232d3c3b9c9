"""The example text pipeline (pipelines/examples/text-minilm.yaml) through the real flow and the real
model server: all-MiniLM-L6-v2 fine-tuned on v1 of the topics data and promoted; an outside OIP v2
client (tritonclient.http) sends strings as a BYTES input and gets classes; then a retrain on v2,
warm-started from the champion, is promoted over it and its record names the champion it started from.

Short sequences (T=12), one trainable encoder layer, few rows and epochs keep it within CPU budgets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton  # type: ignore[import-untyped]
import yaml
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from flows.pipeline import run_pipeline
from flows.records import decision_record
from ml.demo_text import TOPICS
from serving.app import create_serving_app
from serving.loader import sync_from_metadata
from serving.registry import ModelRegistry
from serving.server import running_server
from storage import repositories as repo
from storage.artifacts.local import LocalArtifactStore
from storage.db import transaction
from tests.flows.conftest import event_run

pytest.importorskip("transformers", reason="the text extra is not installed: pip install 'retrainer[text]'")
pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NAME = "text-minilm"
SENTENCES = [
    "The striker scored twice in the cup final.",
    "The central bank raised interest rates again.",
    "Heavy rain flooded the streets of the city.",
]


@pytest.fixture(scope="module")
def topics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ml.demo_text import text_versions

    return text_versions(tmp_path_factory.mktemp("topics"))


def example(**changes: Any) -> dict[str, Any]:
    """The example pipeline on CPU, promoting without a canary rollout (that is the canary tests' story).

    Twelve tokens per row hold each sentence's subject and verb, which decide its topic: the
    evaluation times at least 60 forward passes of a batch of 32, and that cost grows with T."""
    document: dict[str, Any] = yaml.safe_load((ROOT / "pipelines/examples/text-minilm.yaml").read_text())
    document["hardware"] = {"device": "cpu"}
    document["evaluation"] = {"latency_budget_seconds": 0.2}
    document["model"]["input_shape"] = [12]
    document["hyperparameters"]["batch_size"] = 32
    document["model"].update(changes)
    del document["canary"]
    return document


def run(sessions: sessionmaker[Session], document: dict[str, Any], version: str, uri: Path) -> dict[str, Any]:
    """One event-triggered run of the flow on `uri`; its decision record."""
    run_id = event_run(sessions, document, version, uri)
    outcome = run_pipeline(NAME, run_id)
    with transaction(sessions) as session:
        record = decision_record(session, run_id)
    assert record["status"] == outcome["status"]
    return record


def test_fine_tuned_minilm_is_promoted_served_with_strings_and_a_warm_retrain_is_promoted_over_it(
    env: sessionmaker[Session], topics: dict[str, Path], tmp_path: Path
) -> None:
    first = run(env, example(), "v1", topics["v1"])
    assert first["status"] == "promoted", json.dumps(first["decision"]["gate"])
    decision = first["decision"]
    assert decision["candidate"]["metrics"]["accuracy"] >= 0.8
    parameters = decision["training"]["parameters"]
    assert 0 < parameters["trainable"] < parameters["frozen"]  # the encoder is frozen but its last layer
    quantization = decision["quantization"]
    # int8 Linear layers pay on CPU: the dynamic variant is chosen, measured against the float model
    assert quantization["chosen"] == "dynamic", quantization
    dynamic = next(r for r in quantization["results"] if r["variant"] == "dynamic")
    assert dynamic["speedup_b32"] > 1.5 and dynamic["size_ratio"] > 2, dynamic

    with transaction(env) as session:
        champion = repo.get_champion(session, NAME)
    assert champion is not None
    tokenizer = champion.manifest["tokenizer"]
    assert tokenizer["max_length"] == 12 and len(tokenizer["sha256"]) == 64
    assert champion.manifest["standardizer"]["enabled"] is False

    answers = _served_classes(env, tmp_path)
    assert answers == [0, 1, 2]

    # more data, warm-started from the champion: promoted over it, and the record says where it started
    document = example(init={"from": "champion"})
    document["hyperparameters"]["epochs"] = 1  # it starts from a good model
    second = run(env, document, "v2", topics["v2"])
    assert second["status"] == "promoted", json.dumps(second["decision"]["gate"])
    init = second["decision"]["training"]["init"]
    assert init["source"] == "champion" and init["champion_version"] == 1, init
    paired = next(g for g in second["decision"]["gate"] if g["check"] == "vs_champion")
    assert paired["verdict"] == "pass"
    with transaction(env) as session:
        assert repo.get_champion(session, NAME).version == 2  # type: ignore[union-attr]


def _served_classes(sessions: sessionmaker[Session], tmp_path: Path) -> list[int]:
    """The champion served by the real model server; an outside OIP v2 client sends BYTES strings,
    as JSON and as binary tensor data, and the app's own test client sends them as JSON."""
    registry = ModelRegistry()
    report = sync_from_metadata(registry, sessions, LocalArtifactStore(f"file://{tmp_path / 'artifacts'}"))
    assert report[NAME].startswith("loaded champion"), report
    app = create_serving_app(registry)
    with TestClient(app) as local:
        answer = local.post(
            f"/v2/models/{NAME}/infer",
            json={"inputs": [{"name": "input", "datatype": "BYTES", "shape": [3], "data": SENTENCES}]},
        )
    assert answer.status_code == 200, answer.text
    by_test_client = answer.json()["outputs"][1]["data"]
    answers: list[list[int]] = []
    with running_server(app) as url:
        client = triton.InferenceServerClient(url=url.removeprefix("http://").rstrip("/"))
        assert client.get_model_metadata(NAME)["inputs"][0]["datatype"] == "BYTES"
        for binary in (False, True):
            tensor = triton.InferInput("input", [len(SENTENCES)], "BYTES")
            tensor.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=np.object_), binary_data=binary)
            result = client.infer(NAME, [tensor])
            assert result.as_numpy("probabilities").shape == (len(SENTENCES), len(TOPICS))
            answers.append([int(c) for c in result.as_numpy("predicted_class")])
        client.close()
    registry.close()
    assert answers[0] == answers[1] == by_test_client
    return answers[0]
