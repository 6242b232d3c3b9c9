"""A regression model served over real HTTP: a package built with ml.package.manifest_for answers
floats in its target's units (target mean ~1000) through JSON and Triton's HTTP client with its
defaults, its metadata names the `prediction` output, float labels are scored by absolute error,
and both variants' predictions are counted in the champion's bins for the canary's drift check."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from domain.entities import ModelStage, ModelVersion
from domain.evidence import ModelStats
from domain.settings import load_settings
from domain.spec import PipelineSpec
from ml.package import RegressionOutputs, manifest_for, prediction_bin_edges, save_package
from ml.standardizer import TargetStandardizer
from ml.zoo import build_model
from serving.registry import LoadedModel, ModelRegistry, RegressionServing, load_version
from storage.artifacts import open_artifact_store
from tests.serving import test_server
from tests.serving.conftest import FEATURES, STANDARDIZER, tiny_model
from tests.serving.test_server import body, rows_of

app, http, registry = test_server.app, test_server.http, test_server.registry

PIPELINE = "demand"
INFER = f"/v2/models/{PIPELINE}/infer"
TARGETS = TargetStandardizer(mean=np.array([1000.0, 5.0], np.float32), std=np.array([50.0, 2.0], np.float32))


def spec(outputs: int) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": PIPELINE,
            "task": "regression",
            "dataset": "sales",
            "data": {"target": ["units", "returns"][:outputs]},
            "model": {"architecture": "mlp", "params": {"hidden_sizes": [16]}, "input_shape": [FEATURES],
                      "outputs": outputs},
        }
    )  # fmt: skip


def module(seed: int, outputs: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", {"hidden_sizes": [16]}, [FEATURES], outputs).eval()


def targets(outputs: int) -> TargetStandardizer:
    return TargetStandardizer(mean=TARGETS.mean[:outputs], std=TARGETS.std[:outputs])


def expected(net: torch.nn.Module, rows: np.ndarray, outputs: int) -> np.ndarray:
    """What the module says, outside the server, mapped back to the target's units."""
    with torch.inference_mode():
        raw = net(STANDARDIZER.transform_tensor(torch.from_numpy(rows))).numpy()
    return targets(outputs).inverse(raw)


def served(version: str, seed: int, outputs: int = 1, bins: tuple[float, ...] = ()) -> LoadedModel:
    return LoadedModel(
        PIPELINE,
        version,
        module(seed, outputs),
        input_shape=[FEATURES],
        standardizer=STANDARDIZER,
        regression=RegressionServing(outputs, targets(outputs), bins),
    )


def packaged(tmp_path: Path, outputs: int) -> tuple[ModelVersion, torch.nn.Module]:
    """A registered version whose manifest comes from ml.package.manifest_for, stored in an artifact store."""
    net = module(11, outputs)
    edges = prediction_bin_edges(expected(net, rows_of(400, seed=5), outputs).astype(np.float64))
    outputs_of = RegressionOutputs(["units", "returns"][:outputs], targets(outputs), edges)
    manifest = manifest_for(spec(outputs), "none", STANDARDIZER, [f"f{i}" for i in range(FEATURES)],
                            regression=outputs_of)  # fmt: skip
    saved = save_package(net, manifest, tmp_path / "build" / "model.pt")
    store = open_artifact_store(f"file://{tmp_path / 'artifacts'}", load_settings())
    ref = store.put_file(saved.path, key=f"models/{PIPELINE}/1/model.pt")
    now = datetime.now(UTC)
    version = ModelVersion(
        id=7, pipeline=PIPELINE, version=1, run_id=None, artifact_uri=ref.uri, sha256=ref.sha256,
        size_bytes=ref.size, metrics={}, stage=ModelStage.CHAMPION, created_at=now, stage_changed_at=now,
        manifest=manifest,
    )  # fmt: skip
    return version, net


@pytest.fixture
def client(http: httpx.Client) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=str(http.base_url).removeprefix("http://").rstrip("/"))
    yield client
    client.close()


def infer(http: httpx.Client, rows: np.ndarray, path: str = INFER, **extra: object) -> dict[str, object]:
    response = http.post(path, json=body(rows, **extra))
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


def test_a_packaged_regression_model_answers_in_the_targets_units_with_its_metadata(
    tmp_path: Path, registry: ModelRegistry, http: httpx.Client
) -> None:
    version, net = packaged(tmp_path, outputs=2)
    store = open_artifact_store(f"file://{tmp_path / 'artifacts'}", load_settings())
    loaded = load_version(store, version)  # type: ignore[arg-type]
    assert (loaded.task, loaded.width, loaded.output_classes) == ("regression", 2, None)
    assert (
        loaded.regression is not None and list(loaded.regression.prediction_bins) == version.manifest["prediction_bins"]
    )
    registry.set_champion(loaded)

    meta = http.get(f"/v2/models/{PIPELINE}").json()
    assert meta["outputs"] == [{"name": "prediction", "datatype": "FP32", "shape": [-1, 2]}]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}]

    rows = rows_of(4)
    answer = infer(http, rows, id="r-1")
    (prediction,) = answer["outputs"]  # type: ignore[misc]
    assert (prediction["name"], prediction["datatype"], prediction["shape"]) == ("prediction", "FP32", [4, 2])
    values = np.asarray(prediction["data"], dtype=np.float32).reshape(4, 2)
    np.testing.assert_allclose(values, expected(net, rows, 2), rtol=1e-5)
    assert np.all(np.abs(values[:, 0] - 1000.0) < 500.0)  # in the target's units, not standardised ones
    refused = http.post(INFER, json=body(rows, outputs=[{"name": "probabilities"}]))
    assert refused.status_code == 400 and "the model has prediction" in refused.json()["error"]


def test_tritonclient_with_its_defaults_gets_float_predictions(
    registry: ModelRegistry, http: httpx.Client, client: triton.InferenceServerClient
) -> None:
    registry.set_champion(champion := served("1", seed=3, outputs=2))
    rows = rows_of(6)
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)  # binary by default

    everything = client.infer(PIPELINE, [tensor])  # no outputs named: binary_data_output
    as_json = client.infer(PIPELINE, [tensor], outputs=[triton.InferRequestedOutput("prediction", binary_data=False)])
    values = everything.as_numpy("prediction")
    assert values.dtype == np.float32 and values.shape == (6, 2)
    np.testing.assert_allclose(values, expected(champion.model, rows, 2), rtol=1e-5)
    np.testing.assert_array_equal(as_json.as_numpy("prediction"), values)
    assert everything.get_output("prediction")["parameters"] == {"binary_data_size": 6 * 2 * 4}
    metadata = client.get_model_metadata(PIPELINE)
    assert metadata["outputs"] == [{"name": "prediction", "datatype": "FP32", "shape": [-1, 2]}]
    with pytest.raises(InferenceServerException, match="unknown output 'predicted_class'"):
        client.infer(PIPELINE, [tensor], outputs=[triton.InferRequestedOutput("predicted_class")])


def test_float_labels_are_scored_by_absolute_error_per_variant(registry: ModelRegistry, http: httpx.Client) -> None:
    registry.set_champion(served("1", seed=3))
    one = infer(http, rows_of(1), id="one")
    (predicted,) = one["outputs"][0]["data"]  # type: ignore[index]
    scored = http.post(f"/v2/models/{PIPELINE}/feedback", json={"request_id": "one", "label": predicted + 12.5})
    assert scored.status_code == 200, scored.text
    assert scored.json()["mean_abs_error"] == pytest.approx(12.5, rel=1e-4) and scored.json()["labels"] == 1

    three = infer(http, rows_of(3, seed=1), id="three")
    truth = [value - 2.0 for value in three["outputs"][0]["data"]]  # type: ignore[index]
    assert http.post(f"/v2/models/{PIPELINE}/feedback", json={"request_id": "three", "label": truth}).status_code == 200

    window = ModelStats.model_validate(http.get(f"/v2/models/{PIPELINE}/stats").json()).window("champion", 1)
    assert window.labelled == 4 and window.correct == 0
    assert window.abs_error_sum == pytest.approx(12.5 + 3 * 2.0, rel=1e-4)
    assert window.abs_error_sq_sum == pytest.approx(12.5**2 + 3 * 4.0, rel=1e-4)
    metrics = http.get("/metrics").text
    assert f'retrainer_serving_feedback_total{{correct="n/a",pipeline="{PIPELINE}"' in metrics
    assert "retrainer_serving_feedback_abs_error_total" in metrics


def test_several_outputs_take_a_list_per_row_and_the_error_is_their_mean(
    registry: ModelRegistry, http: httpx.Client
) -> None:
    registry.set_champion(served("1", seed=3, outputs=2))
    answer = infer(http, rows_of(2), id="pair")
    predicted = np.asarray(answer["outputs"][0]["data"]).reshape(2, 2)  # type: ignore[index]
    truth = (predicted + np.array([[4.0, 2.0], [-1.0, 1.0]])).tolist()
    scored = http.post(f"/v2/models/{PIPELINE}/feedback", json={"request_id": "pair", "label": truth}).json()
    assert scored["labels"] == 2 and scored["mean_abs_error"] == pytest.approx((3.0 + 1.0) / 2, rel=1e-4)


@pytest.mark.parametrize(
    ("label", "fragment"),
    [
        ([1.0, 2.0, 3.0], "had 2 row(s); send a list of 2 numbers per row"),
        ([[1.0], [2.0]], "rows of [1] value(s) for a model with 2 output(s)"),
        ("high", "must be the true class id (a classifier) or value (a regression model)"),
        ([[1.0, float("nan")], [1.0, 2.0]], "NaN or infinity"),
        (True, "must be the true class id"),
    ],
)
def test_bad_regression_feedback_is_refused_with_the_field_and_the_fix(
    registry: ModelRegistry, http: httpx.Client, label: object, fragment: str
) -> None:
    registry.set_champion(served("1", seed=3, outputs=2))
    infer(http, rows_of(2), id="r")
    payload = json.dumps({"request_id": "r", "label": label})  # NaN as the literal many clients send
    refused = http.post(f"/v2/models/{PIPELINE}/feedback", content=payload)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"].startswith("feedback.label:") and fragment in refused.json()["error"]
    assert (
        http.post(f"/v2/models/{PIPELINE}/feedback", json={"request_id": "r", "label": [[1, 2], [3, 4]]}).json()[
            "labels"
        ]
        == 2
    )  # the refused label did not consume the prediction


def test_a_classifier_refuses_a_float_label(registry: ModelRegistry, http: httpx.Client) -> None:
    registry.set_champion(tiny_model("1"))
    infer(http, rows_of(1), path="/v2/models/digits/infer", id="c")
    refused = http.post("/v2/models/digits/feedback", json={"request_id": "c", "label": 1.5})
    assert refused.status_code == 400
    assert "1.5 is not a class id" in refused.json()["error"] and "is a classifier" in refused.json()["error"]


def test_both_variants_are_counted_in_the_champions_bins(registry: ModelRegistry, http: httpx.Client) -> None:
    rows = rows_of(300, seed=2)
    champion = served("1", seed=3)
    edges = tuple(prediction_bin_edges(expected(champion.model, rows_of(500, seed=9), 1).astype(np.float64)))
    assert len(edges) == 9
    registry.set_champion(served("1", seed=3, bins=edges))
    registry.set_canary(canary := served("2", seed=4, bins=(-1e9, 0.0)), 50)  # its own bins are ignored
    for version in ("1", "2"):
        infer(http, rows, path=f"/v2/models/{PIPELINE}/versions/{version}/infer")
    stats = ModelStats.model_validate(http.get(f"/v2/models/{PIPELINE}/stats").json())
    for variant, version, net in (("champion", 1, champion.model), ("canary", 2, canary.model)):
        bins = np.searchsorted(np.asarray(edges), expected(net, rows, 1)[:, 0], side="right")
        counts = dict(zip(*np.unique(bins, return_counts=True), strict=True))
        assert stats.window(variant, version).class_counts == {str(b): int(c) for b, c in counts.items()}
    champion_counts = stats.window("champion", 1).class_counts
    assert len(champion_counts) >= 8  # the champion's deciles spread its own predictions over the bins
