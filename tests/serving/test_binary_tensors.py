"""The OIP v2 binary tensor data extension over real HTTP: Triton's HTTP client with its defaults,
answers equal to the JSON path's, refusals of malformed binary bodies, and binary requests counted
per variant like JSON ones."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from domain.evidence import ModelStats
from serving.registry import ModelRegistry
from tests.serving import test_server
from tests.serving.conftest import CLASSES, FEATURES, expected_probabilities, tiny_model
from tests.serving.test_server import rows_of

# the server tests' fixtures: a registry for "digits", its app, and an httpx client on a real server
app, http, registry = test_server.app, test_server.http, test_server.registry

INFER = "/v2/models/digits/infer"


def binary_body(rows: np.ndarray, *, size: int | None = None, **extra: object) -> tuple[bytes, dict[str, str]]:
    """A binary request as tritonclient builds it; `size` overrides the declared binary_data_size."""
    raw = rows.astype("<f4").tobytes()
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32",
              "parameters": {"binary_data_size": len(raw) if size is None else size}}  # fmt: skip
    header = json.dumps({"inputs": [tensor], **extra}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


@pytest.fixture
def client(http: httpx.Client) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=str(http.base_url).removeprefix("http://").rstrip("/"))
    yield client
    client.close()


def json_answer(http: httpx.Client, rows: np.ndarray) -> dict[str, np.ndarray]:
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.reshape(-1).tolist()}
    answer = http.post(INFER, json={"inputs": [tensor]})
    assert answer.status_code == 200 and "inference-header-content-length" not in answer.headers
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"]}


def test_triton_client_with_its_defaults_gets_the_json_paths_answer(
    registry: ModelRegistry, http: httpx.Client, client: triton.InferenceServerClient
) -> None:
    registry.set_champion(champion := tiny_model("1"))
    rows = rows_of(5)
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)  # binary by default

    everything = client.infer("digits", [tensor])  # no outputs named: binary_data_output
    named = client.infer("digits", [tensor], outputs=[triton.InferRequestedOutput("predicted_class")])
    mixed = client.infer(
        "digits",
        [tensor],
        outputs=[
            triton.InferRequestedOutput("probabilities"),
            triton.InferRequestedOutput("predicted_class", binary_data=False),
        ],
    )

    expected = json_answer(http, rows)
    probabilities = everything.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (5, CLASSES)
    np.testing.assert_array_equal(probabilities, expected["probabilities"].astype(np.float32))
    np.testing.assert_allclose(probabilities, expected_probabilities(champion, rows), rtol=1e-5, atol=1e-6)
    for result in (everything, named, mixed):
        classes = result.as_numpy("predicted_class")
        assert classes.dtype == np.int64 and classes.tolist() == expected["predicted_class"].tolist()
    assert named.as_numpy("probabilities") is None
    assert mixed.get_output("predicted_class")["data"] == expected["predicted_class"].tolist()  # JSON, as asked
    assert mixed.get_output("probabilities")["parameters"] == {"binary_data_size": 5 * CLASSES * 4}
    np.testing.assert_array_equal(mixed.as_numpy("probabilities"), probabilities)
    assert http.get("/v2").json()["extensions"] == ["binary_tensor_data"]


def test_binary_request_with_a_json_answer_and_a_binary_answer_to_a_json_request(
    registry: ModelRegistry, http: httpx.Client
) -> None:
    registry.set_champion(tiny_model("1"))
    rows = rows_of(2)
    content, headers = binary_body(rows)
    plain = http.post(INFER, content=content, headers=headers)
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"
    assert [o["data"] for o in plain.json()["outputs"]][1] == json_answer(http, rows)["predicted_class"].tolist()

    tensor = {"name": "input", "shape": [2, FEATURES], "datatype": "FP32", "data": rows.reshape(-1).tolist()}
    asked = http.post(INFER, json={"inputs": [tensor], "outputs": [{"name": "predicted_class",
                                                                  "parameters": {"binary_data": True}}]})  # fmt: skip
    assert asked.status_code == 200 and asked.headers["content-type"] == "application/octet-stream"
    length = int(asked.headers["inference-header-content-length"])
    header = json.loads(asked.content[:length])
    assert header["outputs"] == [{"name": "predicted_class", "shape": [2], "datatype": "INT64",
                                  "parameters": {"binary_data_size": 16}}]  # fmt: skip
    assert np.frombuffer(asked.content[length:], "<i8").tolist() == plain.json()["outputs"][1]["data"]


def test_malformed_binary_bodies_are_refused_naming_the_input_sizes_and_fix(
    registry: ModelRegistry, http: httpx.Client, client: triton.InferenceServerClient
) -> None:
    registry.set_champion(tiny_model("1"))
    rows = rows_of(2)
    content, headers = binary_body(rows)

    truncated = http.post(INFER, content=content[:-4], headers=headers)
    assert truncated.status_code == 400
    assert truncated.json()["error"] == (
        "inputs[0] ('input'): binary_data_size is 64 and 60 bytes follow the JSON header, but shape x FP32 needs 64 "
        "(16 values x 4 bytes); send exactly 64 little-endian bytes and set binary_data_size to match"
    )
    wrong_size, headers = binary_body(rows, size=60)
    refused = http.post(INFER, content=wrong_size, headers=headers)
    assert refused.status_code == 400 and "binary_data_size is 60 and 64 bytes follow" in refused.json()["error"]

    beyond = http.post(INFER, content=content, headers={"Inference-Header-Content-Length": str(len(content) + 1)})
    assert beyond.status_code == 400
    assert beyond.json()["error"].startswith(f"Inference-Header-Content-Length: '{len(content) + 1}' is not a JSON")
    not_a_number = http.post(INFER, content=content, headers={"Inference-Header-Content-Length": "-3"})
    assert not_a_number.status_code == 400 and "Inference-Header-Content-Length" in not_a_number.json()["error"]
    no_header = http.post(INFER, content=content[: int(headers["Inference-Header-Content-Length"])])
    assert no_header.status_code == 400 and "has no Inference-Header-Content-Length header" in no_header.json()["error"]

    tensor = {"name": "input", "shape": [2, FEATURES], "datatype": "FP32", "data": rows.reshape(-1).tolist()}
    header = json.dumps({"inputs": [tensor]}).encode()
    trailing = http.post(
        INFER, content=header + b"\0" * 8, headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert trailing.status_code == 400 and "8 bytes follow the JSON header" in trailing.json()["error"]
    flag, headers = binary_body(rows, parameters={"binary_data_output": "yes"})
    bad_flag = http.post(INFER, content=flag, headers=headers)
    assert bad_flag.status_code == 400 and "parameters.binary_data_output: must be true or false" in bad_flag.text

    nan = rows.copy()
    nan[1, 3] = np.nan
    content, headers = binary_body(nan)
    not_finite = http.post(INFER, content=content, headers=headers)
    assert not_finite.status_code == 400 and "element 11 (row-major) is NaN" in not_finite.json()["error"]

    tensor_in = triton.InferInput("input", [2, FEATURES], "FP32")
    tensor_in.set_data_from_numpy(rows)
    tensor_in._parameters["binary_data_size"] = 60  # what a buggy client would declare
    with pytest.raises(InferenceServerException, match="binary_data_size is 60") as raised:
        client.infer("digits", [tensor_in])
    assert raised.value.status() == "400"


def test_binary_requests_count_per_variant_in_the_canarys_window(
    registry: ModelRegistry, http: httpx.Client, client: triton.InferenceServerClient
) -> None:
    registry.set_champion(tiny_model("1"))
    registry.set_canary(tiny_model("2"), 50)
    served: dict[str, int] = {}
    for seed in range(40):
        tensor = triton.InferInput("input", [2, FEATURES], "FP32")
        tensor.set_data_from_numpy(rows_of(2, seed))
        result = client.infer("digits", [tensor])
        version = result.get_response()["model_version"]
        served[version] = served.get(version, 0) + 1
    wrong_width, headers = binary_body(np.zeros((1, FEATURES + 1), dtype=np.float32))
    assert http.post("/v2/models/digits/versions/2/infer", content=wrong_width, headers=headers).status_code == 400

    stats = ModelStats.model_validate(http.get("/v2/models/digits/stats", params={"window_seconds": 60}).json())
    champion, canary = stats.window("champion", 1), stats.window("canary", 2)
    assert served["1"] > 0 and served["2"] > 0
    assert (champion.requests, canary.requests) == (served["1"], served["2"])
    assert sum(canary.class_counts.values()) == 2 * served["2"] and canary.rejected == 1
