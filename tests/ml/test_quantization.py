"""Quantized variants: round trips without pickled code, the selection rule, honest unavailability."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from domain.errors import ArtifactIntegrityError, ArtifactNotFoundError, InvalidInputError
from ml.quantization import (
    FORMAT,
    VARIANTS,
    QuantizationUnavailableError,
    Variant,
    VariantScore,
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
UNAVAILABLE = {("transformer", "static")}


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
    assert not any(isinstance(m, DynamicLinear) for m in original.modules())


def test_dynamic_reaches_every_linear_of_the_transformer_including_attention() -> None:
    model = quantize(_builder("transformer")(), "dynamic")
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, DynamicLinear) for m in model.modules()) == 5  # qkv, out, ff1, ff2, head


def test_fp16_stores_half_and_computes_float() -> None:
    model = nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.Linear(128, 4)).eval()  # big enough to
    fp16 = quantize(model, "fp16")  # outweigh the zip container's per-tensor overhead
    assert serialized_size(fp16, "fp16") < 0.6 * serialized_size(quantize(model, "none"), "none")
    packed = [m for m in fp16.modules() if isinstance(m, DynamicLinear)]
    assert len(packed) == 2 and all(m._packed_params.dtype == torch.float16 for m in packed)
    assert fp16(torch.randn(2, 128)).dtype == torch.float32


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


def test_transformer_static_is_reported_unavailable_with_the_reason() -> None:
    with pytest.raises(QuantizationUnavailableError) as info:
        quantize(_builder("transformer")(), "static", _calibration("transformer"))
    assert info.value.code == "quantization_unavailable"
    assert isinstance(info.value, InvalidInputError)
    assert "Embedding" in info.value.message


def test_static_on_a_model_without_quantized_kernels_is_unavailable_not_faked() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.linear(x)  # `+` has no kernel for quantized tensors

    with pytest.raises(QuantizationUnavailableError) as info:
        quantize(Residual(), "static", [torch.randn(4, 4)])
    assert "static int8 does not run on Residual" in info.value.message


def test_quantizing_contains_the_torch_ao_deprecation_warnings(tmp_path: Path) -> None:
    build = _builder("cnn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for variant in VARIANTS:
            model = quantize(build(), variant, _calibration("cnn"))
            load_quantized(save_quantized(model, variant, tmp_path / f"{variant}.pt").path, build, variant)


# ---------------------------------------------------------------- selection


def _which(model: nn.Module) -> Variant:
    """Tells the variant from the module itself, as an evaluator sees it."""
    if any(type(m).__name__ == "_StaticInt8" for m in model.modules()):
        return "static"
    for module in model.modules():
        if isinstance(module, DynamicLinear):
            return "fp16" if module._packed_params.dtype == torch.float16 else "dynamic"
    return "none"


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
    assert fp16.available and not fp16.eligible and fp16.accuracy_drop == pytest.approx(0.05)
    assert "5.00 points > 1.00 points" in fp16.reason
    assert report.result("dynamic").speedup_b32 == pytest.approx(2.5)
    assert json.loads(json.dumps(report.to_dict()))["chosen"] == "dynamic"


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
    outcome, seen = _select("static", {"none": (0.9, 1.0)}, arch="transformer")
    static = outcome.report.result("static")
    assert seen == ["none"]
    assert not static.available and not static.eligible and static.score is None and "Embedding" in static.reason
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
