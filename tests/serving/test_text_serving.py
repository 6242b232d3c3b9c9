"""A text model served over real HTTP: a PretrainedTextClassifier packaged with ml.package.manifest_for
(its tokenizer in the manifest) takes OIP v2 BYTES strings, as JSON and as Triton's binary tensors,
answers what the model says on the same strings tokenised outside the server, says BYTES in its
metadata, and refuses FP32 (and a numeric model refuses BYTES) with a 400 naming the input and the fix.
A manifest whose tokenizer does not match its sha256 is not loaded at all."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from domain.entities import ModelStage, ModelVersion
from domain.errors import ArtifactIntegrityError, InvalidInputError
from domain.settings import load_settings
from domain.spec import PipelineSpec
from ml.data import fit_standardizer
from ml.package import manifest_for, save_package, tokenizer_of
from ml.text import TextTokenizer
from serving.protocol import parse_body, parse_infer_request
from serving.registry import LoadedModel, ModelRegistry, load_version
from storage.artifacts import open_artifact_store
from tests.serving import test_server
from tests.serving.conftest import tiny_model

pytest.importorskip("transformers", reason="the text extra is not installed: pip install 'retrainer[text]'")
app, http, registry = test_server.app, test_server.http, test_server.registry

PIPELINE = "digits"  # the shared fixtures' registry expects this pipeline name
INFER = f"/v2/models/{PIPELINE}/infer"
LENGTH = 16
TEXTS = ["The striker scored twice.", "Rates rose again at the central bank.", "Fog lingered over the coast."]


def spec() -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": PIPELINE,
            "dataset": "topics",
            "data": {"text_column": "text"},
            "model": {"architecture": "ml.models:PretrainedTextClassifier", "params": {"train_last_layers": 0},
                      "input_shape": [LENGTH], "output_classes": 3},
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelVersion, torch.nn.Module, Path]:
    """A registered text model version (random head on the real MiniLM encoder) in an artifact store."""
    from ml.models import PretrainedTextClassifier

    tmp_path = tmp_path_factory.mktemp("text-serving")
    torch.manual_seed(3)
    net = PretrainedTextClassifier([LENGTH], 3, train_last_layers=0).eval()
    manifest = manifest_for(
        spec(), "none", fit_standardizer(np.zeros((2, LENGTH)), enabled=False), [f"token_{i}" for i in range(LENGTH)]
    )
    ref = open_artifact_store(f"file://{tmp_path / 'artifacts'}", load_settings()).put_file(
        save_package(net, manifest, tmp_path / "build" / "model.pt").path
    )
    stored: dict[str, Any] = {
        "artifact_uri": ref.uri,
        "sha256": ref.sha256,
        "size_bytes": ref.size,
        "manifest": manifest,
    }
    created = dict.fromkeys(("created_at", "stage_changed_at"), datetime.now(UTC))
    version = ModelVersion(9, PIPELINE, 1, None, metrics={}, stage=ModelStage.CHAMPION, **stored, **created)
    return version, net, tmp_path


@pytest.fixture
def loaded(packaged: tuple[ModelVersion, torch.nn.Module, Path]) -> LoadedModel:
    """Loaded per test: a registry retires (closes) the models it served when it closes."""
    version, _, tmp_path = packaged
    store = open_artifact_store(f"file://{tmp_path / 'artifacts'}", load_settings())
    return load_version(store, version)


def expected(packaged: tuple[ModelVersion, torch.nn.Module, Path], texts: list[str]) -> np.ndarray:
    """What the model says on `texts` tokenised outside the server by the manifest's tokenizer."""
    version, net, _ = packaged
    tokenizer = tokenizer_of(version.manifest)
    assert tokenizer is not None
    ids = torch.from_numpy(tokenizer.encode(texts).astype(np.float32))
    with torch.inference_mode():
        return torch.softmax(net(ids), dim=-1).numpy()


def text_body(texts: list[str], shape: list[int] | None = None) -> dict[str, object]:
    return {"inputs": [{"name": "input", "datatype": "BYTES", "shape": shape or [len(texts)], "data": texts}]}


@pytest.fixture
def client(http: httpx.Client) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=str(http.base_url).removeprefix("http://").rstrip("/"))
    yield client
    client.close()


def test_strings_as_json_get_the_models_probabilities_and_metadata_says_bytes(
    registry: ModelRegistry,
    http: httpx.Client,
    loaded: LoadedModel,
    packaged: tuple[ModelVersion, torch.nn.Module, Path],
) -> None:
    registry.set_champion(loaded)
    meta = http.get(f"/v2/models/{PIPELINE}").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "predicted_class"]

    for shape in ([3], [3, 1]):
        answer = http.post(INFER, json=text_body(TEXTS, shape))
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        probabilities = np.asarray(outputs["probabilities"]["data"], np.float32).reshape(3, 3)
        np.testing.assert_allclose(probabilities, expected(packaged, TEXTS), atol=1e-5)
        assert outputs["predicted_class"]["data"] == probabilities.argmax(axis=1).tolist()


def test_tritonclient_sends_bytes_as_json_and_as_binary_tensors(
    registry: ModelRegistry,
    client: triton.InferenceServerClient,
    loaded: LoadedModel,
    packaged: tuple[ModelVersion, torch.nn.Module, Path],
) -> None:
    registry.set_champion(loaded)
    texts = [*TEXTS, "Ünïcode: naïve café, it snowed."]
    for binary in (False, True):
        tensor = triton.InferInput("input", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
        result = client.infer(PIPELINE, [tensor])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected(packaged, texts), atol=1e-5)

    numbers = triton.InferInput("input", [1, LENGTH], "FP32")
    numbers.set_data_from_numpy(np.ones((1, LENGTH), np.float32))
    with pytest.raises(InferenceServerException, match="BYTES"):
        client.infer(PIPELINE, [numbers])


def test_fp32_to_a_text_model_and_bytes_to_a_numeric_model_are_refused_with_the_fix(
    registry: ModelRegistry, http: httpx.Client, loaded: LoadedModel
) -> None:
    registry.set_champion(loaded)
    ids = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, LENGTH], "data": [1.0] * LENGTH}]}
    refused = http.post(INFER, json=ids)
    assert refused.status_code == 400
    assert "inputs[0].datatype" in refused.json()["error"] and "'BYTES'" in refused.json()["error"]

    registry.set_champion(tiny_model("2"))
    refused = http.post(INFER, json=text_body(TEXTS))
    assert refused.status_code == 400
    assert "inputs[0].datatype" in refused.json()["error"] and "'FP32'" in refused.json()["error"]


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        (text_body(TEXTS, [3, 2]), "inputs[0].shape"),
        (text_body(TEXTS, [4]), "inputs[0].data"),
        ({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [2], "data": ["a", 3]}]}, "inputs[0].data"),
    ],
)
def test_bad_bytes_inputs_are_refused_naming_the_field(payload: dict[str, object], names: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        parse_infer_request(payload)
    assert refused.value.code == "invalid_input" and names in refused.value.message


def test_binary_bytes_elements_are_length_prefixed_and_checked() -> None:
    def request(raw: bytes, count: int) -> bytes:
        header = (
            b'{"inputs": [{"name": "input", "datatype": "BYTES", "shape": [%d], '
            b'"parameters": {"binary_data_size": %d}}]}' % (count, len(raw))
        )
        return header + raw

    good = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in TEXTS)
    header_length = len(request(good, 3)) - len(good)
    parsed = parse_body(request(good, 3), str(header_length))
    assert parsed.texts == tuple(TEXTS)

    cut = good[:-3]  # the last element declares more bytes than follow
    with pytest.raises(InvalidInputError) as refused:
        parse_body(request(cut, 3), str(len(request(cut, 3)) - len(cut)))
    assert refused.value.code == "invalid_input" and "past the end" in refused.value.message


def test_a_tokenizer_that_does_not_match_its_sha256_is_not_loaded(
    packaged: tuple[ModelVersion, torch.nn.Module, Path],
) -> None:
    version, _, tmp_path = packaged
    manifest = copy.deepcopy(version.manifest)
    manifest["tokenizer"]["sha256"] = "0" * 64
    store = open_artifact_store(f"file://{tmp_path / 'artifacts'}", load_settings())
    with pytest.raises(ArtifactIntegrityError) as refused:
        load_version(store, dataclasses.replace(version, manifest=manifest))
    assert refused.value.code == "artifact_integrity" and "tokenizer" in refused.value.message
    entry = TextTokenizer.for_data(None, [LENGTH]).to_manifest()
    assert entry["sha256"] == version.manifest["tokenizer"]["sha256"]  # the bundled tokenizer, verbatim
