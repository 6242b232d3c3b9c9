"""Quantized variants (ONNX Runtime): round trips of data only, the selection rule, honest unavailability."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from torch import nn

from domain.errors import ArtifactIntegrityError, ArtifactNotFoundError, InvalidInputError
from ml.evaluation import evaluate, evaluate_regression
from ml.quantization import (
    FORMAT,
    VARIANTS,
    MetricBudget,
    OnnxModule,
    QuantizationUnavailableError,
    Variant,
    VariantScore,
    float_weights,
    load_quantized,
    quantize,
    quantize_and_select,
    save_quantized,
    select_variant,
    serialized_size,
    swap_encoder_layers,
    variants_for,
)
from ml.zoo import build_model

TINY = {
    "mlp": ({"hidden_sizes": [16], "dropout": 0.0}, [12]),
    "cnn": ({"channels": [4, 8]}, [1, 6, 6]),
    "transformer": ({"vocab_size": 17, "d_model": 16, "nhead": 2, "num_layers": 1, "dim_feedforward": 32}, [8]),
}
UNAVAILABLE: set[tuple[str, str]] = set()  # every zoo model exports, and ONNX Runtime quantizes each one


def _builder(architecture: str) -> Callable[[], nn.Module]:
    params, shape = TINY[architecture]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return build_model(architecture, params, shape, 3).eval()

    return build


def _inputs(architecture: str, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    _, shape = TINY[architecture]
    if architecture == "transformer":
        return torch.randint(0, 17, (batch, shape[0]), generator=generator).float()
    return torch.randn(batch, int(torch.tensor(shape).prod()), generator=generator)


def _calibration(architecture: str) -> list[torch.Tensor]:
    return [_inputs(architecture, 8, seed) for seed in range(3)]


CASES = [(arch, variant) for arch in TINY for variant in VARIANTS if (arch, variant) not in UNAVAILABLE]


@pytest.mark.parametrize(("architecture", "variant"), CASES)
def test_round_trip_gives_identical_outputs(tmp_path: Path, architecture: str, variant: Variant) -> None:
    build = _builder(architecture)
    model = quantize(build(), variant, _calibration(architecture))
    saved = save_quantized(model, variant, tmp_path / f"{variant}.pt")

    data = saved.path.read_bytes()
    assert saved.sha256 == hashlib.sha256(data).hexdigest() and saved.size_bytes == len(data)
    assert (tmp_path / f"{variant}.pt.sha256").read_text() == f"{saved.sha256}  {variant}.pt\n"
    assert serialized_size(model, variant) == saved.size_bytes
    assert json.loads(json.dumps(saved.to_dict()))["variant"] == variant

    reloaded = load_quantized(saved.path, build, variant, expected_sha256=saved.sha256)
    x = _inputs(architecture, 5)
    with torch.inference_mode():
        assert torch.equal(reloaded(x), model(x))
        assert torch.equal(copy.deepcopy(reloaded)(x), model(x))  # a copy gets its own session


@pytest.mark.parametrize("architecture", list(TINY))
def test_variants_stay_close_to_float_and_leave_the_original_alone(architecture: str) -> None:
    original = _builder(architecture)()
    before = {key: value.clone() for key, value in original.state_dict().items()}
    x = _inputs(architecture, 4)
    with torch.inference_mode():
        reference = original(x)
        for variant in VARIANTS:
            if (architecture, variant) in UNAVAILABLE:
                continue
            out = quantize(original, variant, _calibration(architecture))(x)
            assert out.shape == reference.shape
            assert (out - reference).abs().max().item() < 0.25, variant
    after = original.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    if architecture == "transformer":  # the encoder layers were swapped on a copy only
        assert type(original.encoder.layers[0]) is nn.TransformerEncoderLayer


def _graph(model: nn.Module) -> onnx.ModelProto:
    assert isinstance(model, OnnxModule)
    return onnx.load_model_from_string(model.onnx_bytes)


def test_dynamic_reaches_every_linear_of_the_transformer_including_attention() -> None:
    model = quantize(_builder("transformer")(), "dynamic", _calibration("transformer"))
    graph = _graph(model)
    int8 = Counter(
        node.op_type
        for node in graph.graph.node
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention")
    )
    # q, k, v (fusion.py makes them MatMuls in front of ONNX's Attention), out, ff1, ff2, head.
    assert int8 == Counter({"MatMulInteger": 7})
    # q, k and v quantize their shared input once
    quantized_inputs = Counter(node.input[0] for node in graph.graph.node if node.op_type == "MatMulInteger")
    assert sorted(quantized_inputs.values()) == [1, 1, 1, 1, 3]
    weights = {tensor.name for tensor in graph.graph.initializer}
    assert not any(
        node.op_type in ("MatMul", "Gemm", "Attention") and node.input[1] in weights for node in graph.graph.node
    )
    assert {e.key: e.value for e in graph.metadata_props}["retrainer.variant"] == "dynamic"


def test_fp16_stores_half_and_computes_float() -> None:
    model = nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.Linear(128, 4)).eval()
    fp16 = quantize(model, "fp16")  # the example input comes from the first Linear's width
    assert serialized_size(fp16, "fp16") < 0.6 * serialized_size(quantize(model, "none"), "none")
    large = [t for t in _graph(fp16).graph.initializer if t.dims and int(torch.tensor(list(t.dims)).prod()) >= 16]
    assert large and all(t.data_type == TensorProto.FLOAT16 for t in large)
    out = fp16(torch.randn(2, 128))
    assert out.dtype == torch.float32 and out.shape == (2, 4)


def test_int8_variants_are_at_least_three_and_a_half_times_smaller() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden_sizes": [512, 512]}, [64], 10).eval()
    float_size = serialized_size(quantize(model, "none"), "none")
    for variant in ("dynamic", "static"):
        quantized = quantize(model, variant, [torch.randn(16, 64)])
        assert float_size / serialized_size(quantized, variant) >= 3.5, variant


def test_attention_swap_matches_multihead_attention_with_masks() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    swapped = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    swapped.load_state_dict(encoder.state_dict())
    swap_encoder_layers(swapped)
    assert type(swapped.layers[0]) is not nn.TransformerEncoderLayer

    x = torch.randn(3, 5, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.inference_mode():
        for kwargs in ({}, {"src_key_padding_mask": padding}, {"mask": causal, "is_causal": True}):
            torch.testing.assert_close(swapped(x, **kwargs), encoder(x, **kwargs), atol=1e-5, rtol=1e-5)


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it, so no ONNX graph exists for it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def test_a_model_the_exporter_cannot_trace_is_unavailable_with_the_reason() -> None:
    for variant in ("dynamic", "static", "fp16"):
        with pytest.raises(QuantizationUnavailableError) as info:
            quantize(_Branchy(), variant, [torch.randn(4, 4)])
        assert info.value.code == "quantization_unavailable" and isinstance(info.value, InvalidInputError)
        assert "cannot be exported to ONNX" in info.value.message and "_Branchy" in info.value.message


def test_int8_without_any_weight_to_quantize_is_unavailable_not_faked() -> None:
    with pytest.raises(QuantizationUnavailableError, match="found nothing to quantize"):
        quantize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), "dynamic", [torch.randn(2, 1, 5, 5)])


def test_quantize_and_evaluate_raise_no_deprecation_warning(tmp_path: Path) -> None:
    build = _builder("cnn")
    x, labels = _inputs("cnn", 40), torch.arange(40) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        for variant in VARIANTS:
            model = quantize(build(), variant, _calibration("cnn"))
            report = evaluate(model, x, labels, num_classes=3, latency_budget_s=0.05)
            assert report.metrics["parameter_count"] == sum(p.numel() for p in build().parameters())
            load_quantized(save_quantized(model, variant, tmp_path / f"{variant}.bin").path, build, variant)


# ---------------------------------------------------------------- selection


def _which(model: nn.Module) -> Variant:
    """Tells the variant from the module itself, as an evaluator sees it."""
    return model.variant if isinstance(model, OnnxModule) else "none"  # type: ignore[return-value]


def _fake_evaluator(
    scores: dict[Variant, tuple[float, float]],
) -> tuple[Callable[[nn.Module], VariantScore], list[str]]:
    seen: list[str] = []

    def evaluate(model: nn.Module) -> VariantScore:
        variant = _which(model)
        seen.append(variant)
        accuracy, latency = scores[variant]
        return VariantScore(accuracy=accuracy, latency_p50_ms_b32=latency, size_bytes=1000)

    return evaluate, seen


def _select(kind: str, scores: dict[Variant, tuple[float, float]], max_drop: float = 0.01, arch: str = "mlp"):
    evaluate, seen = _fake_evaluator(scores)
    outcome = quantize_and_select(
        _builder(arch)(), kind=kind, calibration=iter(_calibration(arch)), evaluate=evaluate, max_accuracy_drop=max_drop
    )
    return outcome, seen


def test_fastest_eligible_variant_is_chosen() -> None:
    scores: dict[Variant, tuple[float, float]] = {
        "none": (0.90, 10.0),
        "dynamic": (0.895, 4.0),  # within 1 point: eligible
        "static": (0.90, 5.0),
        "fp16": (0.85, 3.0),  # fastest, but 5 points worse
    }
    outcome, seen = _select("all", scores)
    report = outcome.report
    assert seen == ["none", "dynamic", "static", "fp16"]
    assert report.chosen == "dynamic" and _which(outcome.model) == "dynamic"
    assert "dynamic is the fastest" in report.reason and "2.50x" in report.reason
    fp16 = report.result("fp16")
    assert fp16.available and not fp16.eligible and fp16.drop == pytest.approx(0.05)
    assert "5.00 points > 1.00 points" in fp16.reason
    assert report.result("dynamic").speedup_b32 == pytest.approx(2.5)
    stored = json.loads(json.dumps(report.to_dict()))
    assert stored["chosen"] == "dynamic" and stored["metric"] == "accuracy" and stored["max_accuracy_drop"] == 0.01


def test_all_ineligible_keeps_float_with_the_reason() -> None:
    outcome, _ = _select("dynamic", {"none": (0.90, 10.0), "dynamic": (0.80, 2.0)})
    assert outcome.report.chosen == "none" and _which(outcome.model) == "none"
    assert outcome.report.reason.startswith("kept the float model: dynamic lost too much accuracy")


def test_an_eligible_variant_that_is_not_faster_loses_to_float_and_ties_go_to_float() -> None:
    slower = select_variant(
        {"none": VariantScore(0.9, 1.0, 10), "fp16": VariantScore(0.9, 1.2, 5)}, {}, max_accuracy_drop=0.01
    )
    assert slower.chosen == "none" and "fp16 was not faster (0.83x float speed)" in slower.reason
    tie = select_variant({"none": VariantScore(0.9, 1.0, 10), "fp16": VariantScore(0.9, 1.0, 5)}, {}, 0.01)
    assert tie.chosen == "none"


def test_drop_exactly_at_the_limit_is_eligible_despite_float_rounding() -> None:
    report = select_variant({"none": VariantScore(0.96, 2.0, 10), "dynamic": VariantScore(0.95, 1.0, 4)}, {}, 0.01)
    assert 0.96 - 0.95 > 0.01  # the binary-float trap the tolerance exists for
    assert report.chosen == "dynamic"


def test_kind_none_evaluates_only_the_float_model() -> None:
    outcome, seen = _select("none", {"none": (0.9, 1.0)})
    assert seen == ["none"] and outcome.report.chosen == "none"
    assert [r.variant for r in outcome.report.results] == ["none"]
    assert "only the float model" in outcome.report.reason


def test_unavailable_variant_is_reported_and_float_kept() -> None:
    evaluate, seen = _fake_evaluator({"none": (0.9, 1.0)})
    outcome = quantize_and_select(
        _Branchy(), kind="static", calibration=[torch.randn(4, 4)], evaluate=evaluate, max_accuracy_drop=0.01
    )
    static = outcome.report.result("static")
    assert seen == ["none"]
    assert not static.available and not static.eligible and static.score is None
    assert "cannot be exported to ONNX" in static.reason
    assert outcome.report.chosen == "none" and "static unavailable" in outcome.report.reason


def test_variants_for_each_kind() -> None:
    assert variants_for("none") == ("none",)
    assert variants_for("static") == ("none", "static")
    assert variants_for("all") == VARIANTS


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call",
    [
        lambda: variants_for("int4"),
        lambda: quantize(nn.Linear(2, 2), "int4"),  # type: ignore[arg-type]
        lambda: quantize(_builder("mlp")(), "static", []),
        lambda: quantize(_builder("mlp")(), "static", [torch.ones(2, 12, dtype=torch.long)]),
        lambda: select_variant({"none": VariantScore(0.9, 1.0, 1)}, {}, max_accuracy_drop=1.5),
        lambda: select_variant({"dynamic": VariantScore(0.9, 1.0, 1)}, {}, max_accuracy_drop=0.01),
        lambda: VariantScore(accuracy=90.0, latency_p50_ms_b32=1.0, size_bytes=1),
        lambda: VariantScore(accuracy=0.9, latency_p50_ms_b32=0.0, size_bytes=1),
        lambda: VariantScore(accuracy=float("nan"), latency_p50_ms_b32=1.0, size_bytes=1),
        lambda: VariantScore(None, 1.0, 1, {"rmse": float("nan")}),
        lambda: VariantScore(None, 1.0, 1, {"rmse": 1.0}).metric("mae"),
        lambda: MetricBudget("rmse", -0.1, higher_is_better=False),
        lambda: MetricBudget("", 0.1),
        lambda: select_variant({"none": VariantScore(0.9, 1.0, 1)}, {}),
        lambda: select_variant({"none": VariantScore(0.9, 1.0, 1)}, {}, 0.01, budget=MetricBudget("accuracy", 0.01)),
    ],
)
def test_bad_input_is_invalid_input(call: Callable[[], object]) -> None:
    with pytest.raises(InvalidInputError) as info:
        call()
    assert info.value.code == "invalid_input"


def test_digest_mismatch_is_an_integrity_error(tmp_path: Path) -> None:
    build = _builder("mlp")
    saved = save_quantized(quantize(build(), "dynamic"), "dynamic", tmp_path / "m.pt")
    with pytest.raises(ArtifactIntegrityError) as info:
        load_quantized(saved.path, build, "dynamic", expected_sha256="0" * 64)
    assert info.value.code == "artifact_integrity"

    tampered = bytearray(saved.path.read_bytes())
    tampered[-30] ^= 0xFF
    saved.path.write_bytes(bytes(tampered))
    with pytest.raises(ArtifactIntegrityError):
        load_quantized(saved.path, build, "dynamic", expected_sha256=saved.sha256)


def test_missing_file_wrong_variant_and_wrong_skeleton(tmp_path: Path) -> None:
    build = _builder("mlp")
    with pytest.raises(ArtifactNotFoundError) as missing:
        load_quantized(tmp_path / "absent.pt", build, "none")
    assert missing.value.code == "artifact_not_found"

    saved = save_quantized(quantize(build(), "dynamic"), "dynamic", tmp_path / "m.pt")
    with pytest.raises(InvalidInputError, match="holds variant 'dynamic', not 'fp16'") as wrong_variant:
        load_quantized(saved.path, build, "fp16")
    assert wrong_variant.value.code == "invalid_input"

    with pytest.raises(InvalidInputError, match="does not fit the model build"):
        load_quantized(saved.path, _builder("cnn"), "dynamic")


class _Payload:
    """Anything that needs code to unpickle."""


def test_a_file_that_needs_code_to_unpickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "variant": "none", "state": _Payload()}, path)
    with pytest.raises(InvalidInputError, match="cannot be loaded safely") as info:
        load_quantized(path, _builder("mlp"), "none")
    assert info.value.code == "invalid_input"


def test_a_variant_saved_by_the_torch_ao_backend_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "variant": "dynamic", "engine": "x86", "state": {}}, path)
    with pytest.raises(InvalidInputError) as info:
        load_quantized(path, _builder("mlp"), "dynamic")
    assert info.value.code == "invalid_input"
    assert "torch.ao" in info.value.message and "retrain the pipeline" in info.value.message


def _resave(graph: onnx.ModelProto, path: Path) -> str:
    data = graph.SerializeToString()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_a_graph_that_reaches_outside_itself_is_refused(tmp_path: Path) -> None:
    build = _builder("mlp")
    graph = _graph(quantize(build(), "dynamic"))

    custom = onnx.ModelProto()
    custom.CopyFrom(graph)
    custom.opset_import.append(onnx.helper.make_opsetid("evil.ops", 1))
    custom.graph.node.append(onnx.helper.make_node("Payload", [], ["unused"], domain="evil.ops"))
    digest = _resave(custom, tmp_path / "custom.onnx")
    with pytest.raises(InvalidInputError, match=r"custom domains \['evil.ops'\]") as info:
        load_quantized(tmp_path / "custom.onnx", build, "dynamic", expected_sha256=digest)
    assert info.value.code == "invalid_input"

    external = onnx.ModelProto()
    external.CopyFrom(graph)
    tensor = next(t for t in external.graph.initializer if t.data_type == TensorProto.FLOAT16)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.append(onnx.StringStringEntryProto(key="location", value="/etc/passwd"))
    _resave(external, tmp_path / "external.onnx")
    with pytest.raises(InvalidInputError, match="external files"):
        load_quantized(tmp_path / "external.onnx", build, "dynamic")

    foreign = onnx.ModelProto()
    foreign.CopyFrom(graph)
    del foreign.metadata_props[:]
    _resave(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(InvalidInputError, match=r"not a retrainer\.quantized/2 variant"):
        load_quantized(tmp_path / "foreign.onnx", build, "dynamic")


def test_the_budget_is_on_a_named_metric_with_its_direction() -> None:
    scores = {
        "none": VariantScore(None, 10.0, 100, {"rmse": 2.0}),
        "dynamic": VariantScore(None, 3.0, 25, {"rmse": 2.6}),  # rmse up 0.6: over a 0.5 budget
        "static": VariantScore(None, 4.0, 25, {"rmse": 2.4}),
        "fp16": VariantScore(None, 8.0, 50, {"rmse": 1.9}),  # better than float: a negative drop
    }
    report = select_variant(scores, {}, budget=MetricBudget("rmse", 0.5, higher_is_better=False))
    assert report.chosen == "static" and report.max_accuracy_drop is None
    assert report.result("dynamic").reason == "rmse drop 0.6 > 0.5"
    assert report.result("fp16").drop == pytest.approx(-0.1) and report.result("fp16").eligible
    assert "static is the fastest variant within the rmse budget" in report.reason
    stored = json.loads(json.dumps(report.to_dict()))
    assert (stored["metric"], stored["higher_is_better"], stored["max_drop"]) == ("rmse", False, 0.5)
    assert stored["results"][0]["score"]["metrics"] == {"rmse": 2.0}

    higher = select_variant(
        {"none": VariantScore(None, 2.0, 1, {"r2": 0.9}), "dynamic": VariantScore(None, 1.0, 1, {"r2": 0.7})},
        {},
        budget=MetricBudget("r2", 0.1),
    )
    assert higher.chosen == "none" and "dynamic lost too much r2" in higher.reason


def test_a_regression_model_is_quantized_and_chosen_on_rmse() -> None:
    torch.manual_seed(0)
    features = torch.randn(256, 12)
    targets = features[:, :1] * 3.0 + 1.0
    model = build_model("mlp", {"hidden_sizes": [32], "dropout": 0.0}, [12], 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.mse_loss(model(features), targets).backward()
        optimiser.step()

    def score(candidate: nn.Module) -> VariantScore:
        report = evaluate_regression(candidate, features, targets, latency_budget_s=0.05)
        return VariantScore(None, report.metrics["latency_p50_ms_b32"], 1, {"rmse": report.metrics["rmse"]})

    outcome = quantize_and_select(
        model.eval(),
        kind="all",
        calibration=[features[:64]],
        evaluate=score,
        budget=MetricBudget("rmse", 0.05, higher_is_better=False),
    )
    results = {r.variant: r for r in outcome.report.results}
    assert set(results) == set(VARIANTS) and all(r.available for r in results.values())
    assert all(abs(r.drop) < 0.05 for r in results.values() if r.drop is not None)  # int8 stays close on rmse
    assert outcome.report.to_dict()["metric"] == "rmse"
    assert _which(outcome.model) == outcome.report.chosen


@pytest.mark.parametrize("variant", ["dynamic", "fp16"])
def test_the_float_weights_come_back_under_the_float_keys(variant: Variant) -> None:
    original = _builder("transformer")()
    quantized = quantize(original, variant, _calibration("transformer"))
    assert isinstance(quantized, OnnxModule)
    state = float_weights(quantized.onnx_bytes, source="champion v1")
    expected = original.state_dict()
    assert set(state) == set(expected)  # every weight, the swapped attention's and the position table included
    for key, tensor in expected.items():
        assert state[key].shape == tensor.shape and torch.allclose(state[key], tensor, atol=0.02), key


def test_every_variant_runs_with_the_measured_session_settings() -> None:
    model = quantize(_builder("mlp")(), "dynamic", _calibration("mlp"))
    assert isinstance(model, OnnxModule)
    options = model._session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == torch.get_num_threads() and options.inter_op_num_threads == 1
    # Spinning inside a call, stopped when it returns (ml/quantization/onnx_graph.py says why).
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    copied = copy.deepcopy(model)  # a copy builds its own session, with the same settings
    assert copied._session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
