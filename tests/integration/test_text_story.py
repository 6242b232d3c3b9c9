"""The example text pipeline (pipelines/examples/text-minilm.yaml) through `retrainer serve` on
PostgreSQL, MinIO and Kafka, with no network: all-MiniLM-L6-v2 fine-tuned on v1 of the topics data,
int8 chosen on its measured speed-up, promoted; an outside OIP v2 client (tritonclient.http, its
defaults) sends strings as a BYTES input to the service's model server and gets classes; then a
retrain on v2, warm-started from the champion, is promoted over it and its record names the champion
it started from."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from flows.records import decision_record
from retrainer import demo as story
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.integration.service import production_stack, retrainer_serve

pytest.importorskip("transformers", reason="the text extra is not installed: pip install 'retrainer[text]'")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]  # fine-tunes a 22M-parameter model twice on CPU
ROOT = Path(__file__).resolve().parents[2]
SENTENCES = [
    "The striker scored twice in the cup final.",
    "The central bank raised interest rates again.",
    "Heavy rain flooded the streets of the city.",
]


def example_spec() -> dict[str, Any]:
    """The example on CPU, promoting without a canary; twelve tokens per row keep CPU time low."""
    document: dict[str, Any] = yaml.safe_load((ROOT / "pipelines/examples/text-minilm.yaml").read_text())
    document["hardware"] = {"device": "cpu"}
    document["evaluation"] = {"latency_budget_seconds": 0.2}
    document["model"]["input_shape"] = [12]
    document["hyperparameters"]["batch_size"] = 32
    document["triggers"] = {"events": {"debounce_seconds": 1, "max_wait_seconds": 10}, "manual": True}
    del document["canary"]
    return document


WARM = {"from": "champion"}
ACTS = (
    story.Act("v1", "v1", "MiniLM fine-tuned on v1", "promoted", 2),
    story.Act(
        "v2",
        "v2",
        "more data, warm-started from the champion",
        "promoted",
        1,
        {"model": {"init": {"from": "champion"}}},
    ),
)


def test_minilm_through_retrainer_serve(
    tmp_path: Path, e2e_database: str, s3_endpoint_url: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tritonclient.http as triton

    from ml.demo_text import text_versions

    files = text_versions(tmp_path / "topics")
    stack = production_stack(
        tmp_path, monkeypatch, database=e2e_database, s3_endpoint_url=s3_endpoint_url,
        kafka_bootstrap=kafka_bootstrap, prefix="text", files=files,
    )  # fmt: skip
    base = example_spec()
    story.write_spec(stack.settings.pipelines_dir, story.spec_for(ACTS[0], base))

    with retrainer_serve(stack.api, tmp_path / "serve.log"):
        sessions = make_sessions(create_db_engine(e2e_database))
        results = story.run_story(
            stack.settings, sessions, serving_url=f"http://{stack.serving}", data=stack.data,
            traffic_rows=files["v1"], acts=ACTS, base_spec=base, act_timeout_s=300,
        )  # fmt: skip
        summary = [(r.act.key, r.status, r.reason) for r in results]
        assert [r.status for r in results] == ["promoted", "promoted"], summary
        with transaction(sessions) as session:
            first = decision_record(session, results[0].run_id)["decision"]
            second = decision_record(session, results[1].run_id)["decision"]
            champion = repo.get_champion(session, base["name"])
        assert first["candidate"]["metrics"]["accuracy"] >= 0.8
        parameters = first["training"]["parameters"]
        assert 0 < parameters["trainable"] < parameters["frozen"]  # the encoder is frozen but its last layer
        quantization = first["quantization"]
        assert quantization["chosen"] == "dynamic", quantization  # int8 measured faster, within the budget
        dynamic = next(r for r in quantization["results"] if r["variant"] == "dynamic")
        assert dynamic["speedup_b32"] > 1.0, dynamic
        init = second["training"]["init"]
        assert init["source"] == "champion" and init["champion_version"] == results[0].model_version, init
        assert champion is not None and champion.version == results[1].model_version
        tokenizer = champion.manifest["tokenizer"]  # stored with the version, applied at serving
        assert tokenizer["max_length"] == 12 and len(tokenizer["sha256"]) == 64
        assert champion.manifest["standardizer"]["enabled"] is False
        paired = next(g for g in second["gate"] if g["check"] == "vs_champion")
        assert paired["verdict"] == "pass", paired

        client = triton.InferenceServerClient(stack.serving)
        request = triton.InferInput("input", [len(SENTENCES)], "BYTES")
        request.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=np.object_))  # binary: default
        # the new champion (a 35 MB int8 graph) is being fetched and verified by the model server: wait for it
        deadline = time.monotonic() + 60
        while (answer := client.infer(base["name"], [request])).get_response()["model_version"] != str(
            champion.version
        ):
            assert time.monotonic() < deadline, "the model server did not serve the new champion within 60 s"
            time.sleep(0.5)
        assert [int(c) for c in answer.as_numpy("predicted_class")] == [0, 1, 2]  # sport, finance, weather
        assert answer.as_numpy("probabilities").shape == (len(SENTENCES), 3)
        as_json = triton.InferInput("input", [len(SENTENCES)], "BYTES")
        as_json.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=np.object_), binary_data=False)
        assert [int(c) for c in client.infer(base["name"], [as_json]).as_numpy("predicted_class")] == [0, 1, 2]
        assert client.get_model_metadata(base["name"])["inputs"][0]["datatype"] == "BYTES"
    story.delete_topics(stack.settings)
