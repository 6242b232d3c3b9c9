"""The model server over real HTTP (uvicorn on a free port): OIP v2 paths, refusals, batching,
traffic split, sticky routing and a version swap under load."""

from __future__ import annotations

import importlib.util
import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI

from domain.evidence import ModelStats, ServedVersion, VariantWindow
from serving.app import create_serving_app
from serving.batching import BatchingConfig
from serving.metrics import ServingMetrics
from serving.registry import LoadedModel, ModelRegistry
from serving.server import running_server
from tests.serving.conftest import CLASSES, FEATURES, CountingModule, expected_probabilities, tiny_model

INFER = "/v2/models/digits/infer"


def body(rows: np.ndarray, **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.reshape(-1).tolist()}], **extra}  # fmt: skip


def rows_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)


@pytest.fixture
def registry() -> Iterator[ModelRegistry]:
    registry = ModelRegistry(["digits"], rng=random.Random(1))  # noqa: S311
    yield registry
    registry.close()


@pytest.fixture
def app(registry: ModelRegistry) -> FastAPI:
    return create_serving_app(registry, max_body_bytes=64 * 1024)


@pytest.fixture
def http(app: FastAPI) -> Iterator[httpx.Client]:
    with (
        running_server(app) as base_url,
        httpx.Client(
            base_url=base_url, timeout=30, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
        ) as client,
    ):
        yield client


def test_health_metadata_and_infer(registry: ModelRegistry, http: httpx.Client) -> None:
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").status_code == 503  # no champion yet
    assert http.post(INFER, json=body(rows_of(1))).status_code == 503
    champion = tiny_model("1")
    registry.set_champion(champion)
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/v2/models/digits/ready").status_code == 200

    meta = http.get("/v2/models/digits").json()
    assert meta == {
        "name": "digits", "versions": ["1"], "platform": "pytorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, CLASSES]},
                    {"name": "predicted_class", "datatype": "INT64", "shape": [-1]}],
    }  # fmt: skip

    rows = rows_of(5)
    response = http.post(INFER, json=body(rows, id="req-1"))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("digits", "1", "req-1")
    probs, classes = answer["outputs"]
    assert (probs["name"], probs["datatype"], probs["shape"]) == ("probabilities", "FP32", [5, CLASSES])
    assert (classes["name"], classes["datatype"], classes["shape"]) == ("predicted_class", "INT64", [5])
    expected = expected_probabilities(champion, rows)
    np.testing.assert_allclose(np.asarray(probs["data"]).reshape(5, CLASSES), expected, rtol=1e-5, atol=1e-6)
    assert classes["data"] == expected.argmax(axis=1).tolist()

    nested = http.post(INFER, json={"inputs": [{"name": "input", "shape": [5, FEATURES], "datatype": "FP32",
                                                 "data": rows.tolist()}],
                                    "outputs": [{"name": "predicted_class"}]}).json()  # fmt: skip
    assert [o["name"] for o in nested["outputs"]] == ["predicted_class"]
    assert nested["outputs"][0]["data"] == classes["data"] and nested["id"]  # an id is made up when not sent
    pinned = http.post("/v2/models/digits/versions/1/infer", json=body(rows))
    assert pinned.status_code == 200 and pinned.json()["model_version"] == "1"


@pytest.mark.parametrize(
    ("mutate", "status", "fragment"),
    [
        (lambda b: b["inputs"][0].update(data=[float("nan")] * FEATURES), 400, "NaN or infinite"),
        (lambda b: b["inputs"][0].update(data=[1e39] * FEATURES), 400, "NaN or infinite"),
        (lambda b: b["inputs"][0].update(datatype="FP64"), 400, "inputs[0].datatype"),
        (lambda b: b["inputs"][0].update(shape=[1, FEATURES + 1], data=[0.0] * (FEATURES + 1)), 400, "inputs[0].shape"),
        (lambda b: b["inputs"][0].update(shape=[2, FEATURES]), 400, "inputs[0].data"),
        (lambda b: b["inputs"][0].update(data=["x"] * FEATURES), 400, "only numbers"),
        (lambda b: b["inputs"][0].update(data=[True] * FEATURES), 400, "true/false"),
        (lambda b: b["inputs"][0].pop("data"), 400, "inputs[0].data"),
        (lambda b: b["inputs"].append({**b["inputs"][0], "name": "extra"}), 400, "unexpected input(s) extra"),
        (lambda b: b.update(inputs=[]), 400, "inputs: missing"),
        (lambda b: b.update(id=5), 400, "id must be a string"),
        (lambda b: b.update(outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
    ],
)
def test_bad_requests_are_refused_with_the_field_and_the_fix(
    registry: ModelRegistry, http: httpx.Client, mutate: object, status: int, fragment: str
) -> None:
    registry.set_champion(tiny_model("1"))
    request = body(rows_of(1))
    mutate(request)  # type: ignore[operator]
    # json.dumps writes NaN as the non-standard literal NaN, which many clients send; it must be a 400
    response = http.post(INFER, content=json.dumps(request), headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_other_refusals(registry: ModelRegistry, http: httpx.Client) -> None:
    registry.set_champion(tiny_model("1"))
    unknown = http.post("/v2/models/nope/infer", json=body(rows_of(1)))
    assert unknown.status_code == 404 and "served models: digits" in unknown.json()["error"]
    assert http.get("/v2/models/nope").status_code == 404
    assert http.post("/v2/models/digits/versions/7/infer", json=body(rows_of(1))).status_code == 404
    assert http.post(INFER, content=b"{not json").status_code == 400
    too_big = http.post(INFER, json=body(rows_of(2000)))  # over the 64 KiB limit of this app
    assert too_big.status_code == 413 and "over 65536 bytes" in too_big.json()["error"]
    assert http.get("/v2/nothing").status_code == 404 and "error" in http.get("/v2/nothing").json()
    wrong_method = http.get(INFER)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json() == {"error": "infer takes POST"}
    routed = http.get("/v2/models/digits/feedback")  # refused by FastAPI's routing: the same table and shape
    assert routed.status_code == 405 and routed.headers["allow"] == "POST"
    assert routed.json() == {"error": "GET is not allowed on /v2/models/digits/feedback; use POST"}
    # a lone UTF-16 surrogate parses with Python's json but cannot be written back: refused, never a 500
    for raw in (
        b'{"id": "\\ud800", "inputs": []}',
        b'{"inputs": [{"name": "\\ud800", "shape": [1, 1], "datatype": "FP32", "data": [0]}]}',
    ):
        lone = http.post(INFER, content=raw, headers={"Content-Type": "application/json"})
        assert lone.status_code == 400 and "surrogate" in lone.json()["error"], lone.text


class DropsARow(torch.nn.Module):
    """A broken model: one row fewer out than in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0] - 1, CLASSES)


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_a_model_answering_the_wrong_number_of_rows_fails_loudly(
    registry: ModelRegistry, http: httpx.Client, batching: bool
) -> None:
    registry.set_champion(
        LoadedModel("digits", "1", DropsARow(), input_shape=[FEATURES], output_classes=CLASSES,
                    batching=BatchingConfig(enabled=batching))
    )  # fmt: skip
    answer = http.post(INFER, json=body(rows_of(3)))
    assert answer.status_code == 500 and "returned shape [2, 3] for 3 rows" in answer.json()["error"], answer.text


def test_an_unexpected_exception_is_a_500_that_points_at_the_log(
    registry: ModelRegistry, app: FastAPI, http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_infer(*_args: object) -> tuple[dict[str, object], str]:
        raise KeyError("a bug, not a refusal")

    app.infer_handler = broken_infer  # type: ignore[attr-defined]
    answer = http.post(INFER, json=body(rows_of(1)))
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error (KeyError); see the server log"}
    assert answer.headers["content-type"] == "application/json"
    logged = [r for r in caplog.records if r.name == "retrainer.serving" and r.exc_info]
    assert logged and logged[-1].exc_info is not None and logged[-1].exc_info[0] is KeyError

    def broken_route() -> None:
        raise ValueError("a bug behind FastAPI's routing")

    app.add_api_route("/v2/broken", broken_route)
    routed = http.get("/v2/broken")
    assert routed.status_code == 500 and routed.json() == {"error": "internal error (ValueError); see the server log"}


def test_feedback_and_metrics(registry: ModelRegistry, http: httpx.Client) -> None:
    registry.set_champion(tiny_model("1"))
    answer = http.post(INFER, json=body(rows_of(1), id="u-1")).json()
    predicted = answer["outputs"][1]["data"][0]
    scored = http.post("/v2/models/digits/feedback", json={"request_id": "u-1", "label": predicted})
    assert scored.status_code == 200, scored.text
    assert scored.json() | {} == {"request_id": "u-1", "model_name": "digits", "model_version": "1",
                                  "variant": "champion", "labels": 1, "correct": 1}  # fmt: skip
    assert http.post("/v2/models/digits/feedback", json={"request_id": "u-1", "label": 0}).status_code == 404
    assert http.post("/v2/models/digits/feedback", json={"request_id": "u-2", "label": "a"}).status_code == 400
    http.post(INFER, json={"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}]})

    text = http.get("/metrics").text
    labels = 'pipeline="digits",variant="champion",version="1"'
    assert f"retrainer_serving_requests_total{{{labels}}} 1.0" in text
    assert f'retrainer_serving_errors_total{{kind="client",{labels}}} 1.0' in text
    assert "retrainer_serving_request_latency_seconds_bucket" in text
    assert f'retrainer_serving_predictions_total{{class="{predicted}",{labels}}} 1.0' in text
    assert f"retrainer_serving_forward_passes_total{{{labels}}} 1.0" in text


def test_concurrent_requests_share_forward_passes(registry: ModelRegistry, http: httpx.Client) -> None:
    champion = tiny_model("1", batching=BatchingConfig(max_batch_size=64, max_wait_ms=25))
    registry.set_champion(champion)
    requests = [rows_of(1 + i % 3, seed=i) for i in range(32)]
    barrier = threading.Barrier(32)

    def call(rows: np.ndarray) -> httpx.Response:
        barrier.wait()
        return http.post(INFER, json=body(rows))

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(call, requests))
    assert [r.status_code for r in responses] == [200] * 32
    counting = champion.model
    assert isinstance(counting, CountingModule)
    passes = counting.calls
    assert passes == champion.forward_passes
    assert passes < 32, f"{passes} forward passes for 32 concurrent requests: batching did not batch"
    for rows, response in zip(requests, responses, strict=True):
        got = np.asarray(response.json()["outputs"][0]["data"]).reshape(len(rows), CLASSES)
        np.testing.assert_allclose(got, expected_probabilities(champion, rows), rtol=1e-5, atol=1e-6)


def test_traffic_split_and_sticky_routing(registry: ModelRegistry, app: FastAPI, http: httpx.Client) -> None:
    registry.set_champion(tiny_model("1"))
    registry.set_canary(tiny_model("2"), 50)
    payload = body(rows_of(1))
    versions = [http.post(INFER, json=payload).json()["model_version"] for _ in range(400)]
    assert 160 <= versions.count("2") <= 240, versions.count("2")

    for user in ("alice", "bob", "carol", "dave"):
        seen = {http.post(INFER, json=payload, headers={"X-Retrainer-Sticky": user}).json()["model_version"]
                for _ in range(15)}  # fmt: skip
        assert len(seen) == 1, (user, seen)
    users = {http.post(INFER, json=payload, headers={"X-Retrainer-Sticky": f"user-{i}"}).json()["model_version"]
             for i in range(40)}  # fmt: skip
    assert users == {"1", "2"}
    meta = http.get("/v2/models/digits").json()
    assert meta["versions"] == ["1", "2"]

    metrics: ServingMetrics = app.state.metrics  # the in-process view the canary controller reads
    snapshot = {s.variant: s for s in metrics.snapshot("digits")}
    assert snapshot["canary"].version == "2" and snapshot["canary"].requests > 100
    assert snapshot["champion"].latency_p99_ms is not None


def test_swap_under_load_drops_no_request(registry: ModelRegistry, http: httpx.Client) -> None:
    registry.set_champion(tiny_model("1"))
    stop = threading.Event()
    payload = body(rows_of(2))

    def stream() -> list[tuple[int, str]]:
        out = []
        while not stop.is_set():
            r = http.post(INFER, json=payload)
            out.append((r.status_code, r.json().get("model_version", r.text)))
        return out

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream) for _ in range(8)]
        time.sleep(0.4)
        registry.set_champion(tiny_model("2"))
        time.sleep(0.4)
        stop.set()
        results = [item for f in futures for item in f.result()]
    assert results and all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:3]
    assert {v for _, v in results} == {"1", "2"}
    assert http.post(INFER, json=payload).json()["model_version"] == "2"


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient[http] is not installed")
def test_triton_http_client_speaks_to_the_server(registry: ModelRegistry, http: httpx.Client) -> None:
    import tritonclient.http as triton  # type: ignore[import-not-found]

    registry.set_champion(tiny_model("1"))
    client = triton.InferenceServerClient(url=str(http.base_url).removeprefix("http://").rstrip("/"))
    assert client.is_server_live() and client.is_model_ready("digits")
    tensor = triton.InferInput("input", [3, FEATURES], "FP32")
    tensor.set_data_from_numpy(rows_of(3), binary_data=False)
    result = client.infer(
        "digits", [tensor], outputs=[triton.InferRequestedOutput("predicted_class", binary_data=False)]
    )
    assert result.as_numpy("predicted_class").shape == (3,)


def test_stats_answer_is_the_typed_window_the_controller_reads(registry: ModelRegistry, http: httpx.Client) -> None:
    registry.set_champion(tiny_model("1"))
    registry.set_canary(tiny_model("2"), 30)
    for version in ("1", "2", "2"):
        answer = http.post(f"/v2/models/digits/versions/{version}/infer", json=body(rows_of(2))).json()
        assert answer["model_version"] == version
    wrong_width = np.zeros((1, FEATURES + 1), dtype=np.float32)
    refused = http.post("/v2/models/digits/versions/2/infer", json=body(wrong_width))
    assert refused.status_code == 400

    response = http.get("/v2/models/digits/stats", params={"window_seconds": 60})
    assert response.status_code == 200
    stats = ModelStats.model_validate(response.json())
    assert (stats.name, stats.window_seconds) == ("digits", 60)
    assert stats.champion == ServedVersion(version="1", weight=70) and stats.canary == ServedVersion(
        version="2", weight=30
    )
    canary = stats.window("canary", 2)
    assert (canary.version, canary.requests, canary.errors, canary.rejected) == ("2", 2, 0, 1)
    assert sum(canary.class_counts.values()) == 4 and canary.latency_p99_ms is not None
    assert stats.window("champion", 1).requests == 1
    assert stats.window("canary", 3) == VariantWindow(version="3")  # served nothing in the window: empty, never absent
    for entry in response.json()["variants"]:  # the JSON users saw before, now a superset
        assert {"pipeline", "variant", "version", "requests", "errors", "latency_p99_ms", "class_counts"} <= set(entry)

    bad = http.get("/v2/models/digits/stats", params={"window_seconds": 0})
    assert bad.status_code == 400 and "window_seconds" in bad.json()["error"]
    assert http.get("/v2/models/nope/stats").status_code == 404


def test_tune_process_freezes_what_is_imported_and_collects_less_often() -> None:
    import gc

    from serving.server import GC_THRESHOLDS, tune_process

    thresholds, threads = gc.get_threshold(), torch.get_num_threads()
    try:
        tune_process(1, fixed_mmap_threshold=False)
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 10_000  # the imported modules, never walked by a collection again
        assert torch.get_num_threads() == 1
    finally:  # process-wide settings: the other tests run with Python's own
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        torch.set_num_threads(threads)
