"""Quantized variants of a trained float model for CPU inference, and the choice between them.

Variants (`quantization.type` in a spec): `none` (the float model), `dynamic` (int8 weights, int8
activations quantized per call, for nn.Linear), `static` (int8 weights and activations, calibrated),
`fp16` (weights stored half, computed in float). `quantize_and_select` builds the float model and the
variant(s) asked for, scores each with the caller's evaluator and keeps the fastest whose accuracy
drop is within the limit; `save_quantized` / `load_quantized` persist any variant as tensors only.

Backend: torch.ao.quantization (eager mode, fbgemm/x86 kernels), not torchao. Measured on this
machine (2-core AMD EPYC, AVX-512 VNNI, torch 2.15, torchao 0.18; `bench/quantization.py`, p50 ms,
round-robin; digits MLP with hidden [1024, 1024], zoo transformer d_model 64):

- torch.ao dynamic int8: MLP b32 0.32 vs 0.83 float (2.6x), b1 0.17 vs 0.18; transformer b32
  1.02x. It pays with width: b32 speed-up 0.65x / 0.98x / 2.7x / 4.8x for MLP widths 128-64 /
  512-256 / 1024-1024 / 2048-2048, and 1.1x / 1.6x / 2.2x for transformer d_model 64 / 128 / 256
  (at d_model 64 the quantize-activations step costs what the int8 GEMM saves).
- torchao eager (no compile) is slower than float everywhere: Int8DynamicActivationInt8Weight MLP
  b32 1.23 ms (0.68x), b1 0.90 ms (5x slower); Int8WeightOnly b32 1.05 ms (0.79x); transformer b32
  0.67x / 0.85x. With torch.compile (one-off run): 5-30 s compile per model and shape; MLP b32 still
  0.40x float (0.49x with inductor freezing, a process-wide setting, which does reach 3.3x at b1), and
  compiling the quantized transformer with freezing crashed inside inductor. Not a serving path yet.
- torch.ao warns on every call that it is deprecated (it announces removal "in 2.10"; it is still
  here in 2.15). The warnings are caught locally (`_torch_ao_quiet`), never process-wide. If it does
  go, this module is the one place to change.
- fp16 computed in half (`model.half()`) is slow here: no fp16 arithmetic on this CPU, every op
  converts: MLP b32 0.40x, transformer 0.12x. So `fp16` keeps activations float and uses fbgemm's
  fp16-weight GEMM for nn.Linear (MLP 1.4x, CNN 1.07x, transformer 0.8-0.97x) with every other float
  tensor rounded to half; its artifact is 1.7-2x smaller.
- `static`: MLP 2.35x, zoo CNN 1.7x (conv+bn+relu fused, residual add through FloatFunctional),
  3.8x / 2.4x smaller. Unavailable for the transformer (token ids feed an Embedding; no quantized
  attention kernels); for other models it is attempted and, if an op has no quantized kernel,
  reported unavailable with that op, never faked.
- The transformer's int8 layers cannot use torch's fused encoder kernel, so `dynamic` and `fp16`
  swap each nn.TransformerEncoderLayer for the same maths on scaled_dot_product_attention with its
  projections as nn.Linear (nn.MultiheadAttention hides three quarters of its weights from dynamic
  quantization). In float that path alone measured 0.98-1.15x of the fused kernel: no gain hidden
  in the int8 numbers.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import math
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao import quantization as ao_quant
from torch.ao.nn.quantized import FloatFunctional

from domain.errors import ArtifactIntegrityError, ArtifactNotFoundError, InvalidInputError
from ml.zoo import ResidualCNN, _ResidualBlock

Variant = Literal["none", "dynamic", "static", "fp16"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
FORMAT = "retrainer.quantized/1"
# Differences below this are float noise from subtracting accuracies (0.96 - 0.95 > 0.01 in binary).
_DROP_TOLERANCE = 1e-9


class QuantizationUnavailableError(InvalidInputError):
    """The variant cannot be applied to this architecture; the message says why."""

    code = "quantization_unavailable"


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class VariantScore:
    """What the caller's evaluator measured for one variant. accuracy is a fraction (0..1)."""

    accuracy: float
    latency_p50_ms_b32: float
    size_bytes: int

    def __post_init__(self) -> None:
        if not (0.0 <= self.accuracy <= 1.0) or math.isnan(self.accuracy):
            raise InvalidInputError(f"VariantScore.accuracy must be a fraction in [0, 1] (got {self.accuracy})")
        if not (self.latency_p50_ms_b32 > 0.0) or math.isinf(self.latency_p50_ms_b32):
            raise InvalidInputError(f"VariantScore.latency_p50_ms_b32 must be > 0 (got {self.latency_p50_ms_b32})")
        if self.size_bytes < 0:
            raise InvalidInputError(f"VariantScore.size_bytes must be >= 0 (got {self.size_bytes})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VariantResult:
    """One variant in the report. `reason` says why it is unavailable or ineligible, or what it gains."""

    variant: Variant
    available: bool
    eligible: bool
    reason: str
    score: VariantScore | None = None
    accuracy_drop: float | None = None  # float accuracy minus this variant's, as a fraction
    speedup_b32: float | None = None  # float latency / this variant's latency
    size_ratio: float | None = None  # float size / this variant's size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QuantizationReport:
    """Every variant tried, and the one chosen: the fastest whose accuracy drop is within the limit."""

    chosen: Variant
    reason: str
    max_accuracy_drop: float
    results: tuple[VariantResult, ...]

    def result(self, variant: Variant) -> VariantResult:
        for result in self.results:
            if result.variant == variant:
                return result
        raise InvalidInputError(
            f"variant {variant!r} was not tried (tried: {', '.join(r.variant for r in self.results)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "reason": self.reason,
            "max_accuracy_drop": self.max_accuracy_drop,
            "results": [result.to_dict() for result in self.results],
        }


@dataclass(frozen=True)
class QuantizationOutcome:
    """The chosen model (an eval-mode CPU copy of the float model when no variant qualifies) and the report."""

    model: nn.Module
    report: QuantizationReport


@dataclass(frozen=True)
class SavedVariant:
    path: Path
    variant: Variant
    sha256: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "variant": self.variant, "sha256": self.sha256, "size_bytes": self.size_bytes}


def variants_for(kind: str) -> tuple[Variant, ...]:
    """The variants a spec's `quantization.type` asks to try: always the float model, plus the one named
    (`all`, for benchmarks, tries every variant)."""
    if kind == "all":
        return VARIANTS
    if kind not in VARIANTS:
        raise InvalidInputError(f"quantization type {kind!r} is unknown; use one of {', '.join(VARIANTS)} or all")
    return ("none",) if kind == "none" else ("none", cast(Variant, kind))


# ---------------------------------------------------------------- transforms


@contextmanager
def _torch_ao_quiet() -> Iterator[None]:
    # torch.ao.quantization warns on every call that it is deprecated in favour of torchao. We use it
    # on purpose (module docstring: torchao's int8 path is slower than float on CPU without
    # torch.compile), so the warning says nothing new; it is silenced here only, never process-wide.
    # (Before Python 3.14 catch_warnings swaps a process-global filter list: quantize from one thread.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        # The x86 default qconfig itself still passes reduce_range, which the observers call deprecated.
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max")
        # The loader converts an uncalibrated skeleton whose qparams are then overwritten by the saved state.
        warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")
        yield


class _ProjectedSelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention with both projections as nn.Linear modules.

    nn.MultiheadAttention keeps its input projection as a bare parameter and its output projection as
    a Linear subclass that dynamic quantization deliberately skips, so three quarters of the attention
    weights would stay float. Same weights, same maths (masks included), in a form int8 can reach.
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        # TransformerEncoder reads `batch_first` from its first layer's self_attn.
        self.batch_first = attention.batch_first
        self.num_heads = attention.num_heads
        width = attention.embed_dim
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        with torch.no_grad():
            self.in_proj.weight.copy_(attention.in_proj_weight)
            self.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.in_proj_bias is not None:
                cast(torch.Tensor, self.in_proj.bias).copy_(attention.in_proj_bias)
            if attention.out_proj.bias is not None:
                cast(torch.Tensor, self.out_proj.bias).copy_(attention.out_proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, length, width = x.shape
        heads = self.num_heads
        qkv = self.in_proj(x).view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, heads, length, x.dtype)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=mask, is_causal=is_causal and mask is None
        )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return cast(torch.Tensor, out if self.batch_first else out.transpose(0, 1))


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    length: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    # nn.MultiheadAttention's boolean masks mean "True = do not attend", SDPA's the opposite; an additive
    # float mask means the same to both.
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    combined: torch.Tensor | None = None
    if attn_mask is not None:
        combined = additive(attn_mask)
        if combined.dim() == 3:  # (batch * heads, L, L)
            combined = combined.view(batch, heads, length, length)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, length)
        combined = padding if combined is None else combined + padding
    return combined


class _QuantizableEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer's forward without its fused fast path, over `_ProjectedSelfAttention`.

    The fused kernel (`torch._transformer_encoder_layer_fwd`) reads the Linear weights as float tensors
    and fails on quantized modules, so a quantized layer must take the plain path.
    """

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.self_attn = _ProjectedSelfAttention(layer.self_attn)
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout, self.dropout1, self.dropout2 = layer.dropout, layer.dropout1, layer.dropout2
        self.norm_first = layer.norm_first
        self.activation: Callable[[torch.Tensor], torch.Tensor] = layer.activation

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._attend(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attend(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._feed_forward(x))  # type: ignore[no-any-return]

    def _attend(
        self, x: torch.Tensor, mask: torch.Tensor | None, padding: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, mask, padding, is_causal))  # type: ignore[no-any-return]

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))  # type: ignore[no-any-return]


def _attention_unsupported(attention: nn.MultiheadAttention) -> str | None:
    if not attention._qkv_same_embed_dim:
        return "separate q/k/v projection weights"
    if attention.bias_k is not None or attention.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    return None


def _swap_encoder_layers(model: nn.Module) -> None:
    for module in list(model.modules()):
        if isinstance(module, nn.TransformerEncoder):
            # The nested-tensor path reads fused-kernel weights from the layers; it is a fast-path feature only.
            module.use_nested_tensor = False
        for name, child in list(module.named_children()):
            # Exact type: a subclass may override forward, and then our layer would not compute the same thing.
            if type(child) is nn.TransformerEncoderLayer and _attention_unsupported(child.self_attn) is None:
                setattr(module, name, _QuantizableEncoderLayer(child))


def _dynamic_int8(model: nn.Module) -> nn.Module:
    _swap_encoder_layers(model)
    if not any(type(m) is nn.Linear for m in model.modules()):
        raise QuantizationUnavailableError(
            f"dynamic int8 quantizes nn.Linear layers and {type(model).__name__} has none that it can reach"
        )
    return _quantize_linear_layers(model, torch.qint8)


class _StaticInt8(nn.Module):
    """Quantizes the input once, runs the converted model on quantized tensors, dequantizes the output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.quant = ao_quant.QuantStub()
        self.model = model
        self.dequant = ao_quant.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.model(self.quant(x)))  # type: ignore[no-any-return]


class _QuantReadyResidualBlock(nn.Module):
    """The zoo's residual block with its ReLU as a module (so it fuses into the conv) and its skip
    connection as a FloatFunctional: `a + b` has no kernel for quantized tensors, `add_relu` does."""

    def __init__(self, block: _ResidualBlock) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.relu1 = nn.ReLU()
        self.shortcut = block.shortcut
        self.skip = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.skip.add_relu(out, self.shortcut(x))


def _static_unavailable_reason(model: nn.Module) -> str | None:
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return (
                "static int8 quantizes the model's input, and this model's input is token ids for an "
                "nn.Embedding lookup (ids cannot be quantized; eager-mode static has no quantized embedding "
                "followed by float-to-int8 hand-over); use dynamic"
            )
        if isinstance(module, nn.MultiheadAttention | nn.TransformerEncoderLayer):
            return (
                "eager-mode static int8 has no quantized kernels for nn.MultiheadAttention (input projection "
                "held as a bare parameter, softmax and the attention matmuls run on activations); torch's "
                "quantizable MultiheadAttention is a custom-module reference path, not a fast one; use dynamic"
            )
    if isinstance(model, ResidualCNN):
        return None
    for module in model.modules():
        if type(module) is _ResidualBlock:
            return "the zoo's residual block only becomes quantizable inside the zoo's ResidualCNN"
    return None


def _static_int8(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    reason = _static_unavailable_reason(model)
    if reason:
        raise QuantizationUnavailableError(reason)
    with _torch_ao_quiet():
        groups: list[list[str]] = []
        if isinstance(model, ResidualCNN):
            groups = _prepare_residual_cnn(model)
        wrapper = _StaticInt8(model).eval()
        if groups:
            ao_quant.fuse_modules(wrapper.model, groups, inplace=True)  # type: ignore[no-untyped-call]
        wrapper.qconfig = ao_quant.get_default_qconfig(torch.backends.quantized.engine)  # type: ignore[no-untyped-call]
        try:
            ao_quant.prepare(wrapper, inplace=True)  # type: ignore[no-untyped-call]
            with torch.inference_mode():
                for batch in calibration:
                    wrapper(batch)
            ao_quant.convert(wrapper, inplace=True)  # type: ignore[no-untyped-call]
            if calibration:
                with torch.inference_mode():
                    wrapper(calibration[0][:2])
        except Exception as e:  # eager static mode fails in many ways on modules not written for it
            raise QuantizationUnavailableError(
                f"static int8 does not run on {type(model).__name__}: {_first_line(e)} (eager-mode static "
                "quantization needs every operation between QuantStub and DeQuantStub to have a quantized kernel)"
            ) from e
    return wrapper


def _prepare_residual_cnn(model: ResidualCNN) -> list[list[str]]:
    """Makes the zoo's CNN quant-ready in place; returns the module groups to fuse (conv+bn[+relu])."""
    groups = [["stem.0", "stem.1", "stem.2"]]
    stages = model.stages
    for index, block in enumerate(list(stages)):
        ready = _QuantReadyResidualBlock(cast(_ResidualBlock, block))
        stages[index] = ready
        prefix = f"stages.{index}"
        groups += [[f"{prefix}.conv1", f"{prefix}.bn1", f"{prefix}.relu1"], [f"{prefix}.conv2", f"{prefix}.bn2"]]
        if isinstance(ready.shortcut, nn.Sequential):
            groups.append([f"{prefix}.shortcut.0", f"{prefix}.shortcut.1"])
    return groups


def _fp16(model: nn.Module) -> nn.Module:
    # Every float tensor is rounded to half first, so the accuracy measured here is the accuracy of
    # what is stored, and storing half (`_payload`) then loading loses nothing further.
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half())
    _swap_encoder_layers(model)
    if not any(type(m) is nn.Linear for m in model.modules()):
        return model  # nothing for the fp16 GEMM; the artifact is still stored half
    # fbgemm's fp16 GEMM: weights packed half, activations and accumulation float (no fp16 ALUs here).
    return _quantize_linear_layers(model, torch.float16)


def _quantize_linear_layers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    with _torch_ao_quiet():
        quantized = ao_quant.quantize_dynamic(model, {nn.Linear}, dtype=dtype, inplace=True)  # type: ignore[no-untyped-call]
    return cast(nn.Module, quantized)


def quantize(model: nn.Module, variant: Variant, calibration: Iterable[torch.Tensor] = ()) -> nn.Module:
    """A CPU copy of `model` (never modified) transformed into `variant`.

    `static` calibrates its activation ranges over every batch in `calibration` (take as many as the
    spec's calibration_batches); the other variants use the first batch, if any, to check they run.
    QuantizationUnavailableError says why a variant cannot be applied to this architecture.
    """
    if variant not in VARIANTS:
        raise InvalidInputError(f"quantization variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}")
    batches = [_check_batch(batch, index) for index, batch in enumerate(calibration)]
    if variant == "static" and not batches:
        raise InvalidInputError("static quantization needs at least one calibration batch")
    return _transform(model, variant, batches)


def _transform(model: nn.Module, variant: Variant, batches: list[torch.Tensor]) -> nn.Module:
    # Without batches (the loader's case) static int8 gets placeholder qparams that the saved state replaces.
    working = copy.deepcopy(model).cpu().eval()
    if variant == "none":
        return working
    if variant == "static":
        return _static_int8(working, batches)
    result = _dynamic_int8(working) if variant == "dynamic" else _fp16(working)
    if batches:
        try:
            with torch.inference_mode(), _torch_ao_quiet():
                result(batches[0][:2])
        except (RuntimeError, NotImplementedError) as e:
            raise QuantizationUnavailableError(
                f"{variant} does not run on {type(model).__name__} with the {torch.backends.quantized.engine} "
                f"quantized engine: {_first_line(e)}"
            ) from e
    return result.eval()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _check_batch(batch: object, index: int) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or batch.dim() < 2:
        described = (
            f"{batch.dtype} tensor of shape {list(batch.shape)}"
            if isinstance(batch, torch.Tensor)
            else type(batch).__name__
        )
        raise InvalidInputError(f"calibration batch {index} must be a float tensor [batch, ...] (got {described})")
    return batch.detach().cpu()


# ---------------------------------------------------------------- selection


def select_variant(
    scores: Mapping[Variant, VariantScore], unavailable: Mapping[Variant, str], max_accuracy_drop: float
) -> QuantizationReport:
    """The selection rule on its own: among the float model ("none", always eligible) and every variant
    whose accuracy drop vs float is <= max_accuracy_drop, the lowest batch-32 latency wins; a tie goes to
    the float model (no gain is worth any risk)."""
    if not (0.0 <= max_accuracy_drop <= 1.0):
        raise InvalidInputError(f"max_accuracy_drop must be a fraction in [0, 1] (got {max_accuracy_drop})")
    if "none" not in scores:
        raise InvalidInputError("select_variant needs the float model's score under 'none'")
    baseline = scores["none"]
    results: list[VariantResult] = []
    for variant in VARIANTS:
        if variant in unavailable:
            results.append(VariantResult(variant, available=False, eligible=False, reason=unavailable[variant]))
            continue
        if variant not in scores:
            continue
        score = scores[variant]
        drop = baseline.accuracy - score.accuracy
        speedup = baseline.latency_p50_ms_b32 / score.latency_p50_ms_b32
        size_ratio = baseline.size_bytes / score.size_bytes if score.size_bytes else None
        eligible = drop <= max_accuracy_drop + _DROP_TOLERANCE
        if variant == "none":
            reason = "the float model (baseline)"
        elif eligible:
            reason = f"accuracy drop {_points(drop)} <= {_points(max_accuracy_drop)}; {speedup:.2f}x float speed"
        else:
            reason = f"accuracy drop {_points(drop)} > {_points(max_accuracy_drop)}"
        results.append(VariantResult(variant, True, eligible, reason, score, drop, speedup, size_ratio))

    eligible_results = [r for r in results if r.eligible and r.score is not None]
    best = min(eligible_results, key=lambda r: (cast(VariantScore, r.score).latency_p50_ms_b32, r.variant != "none"))
    return QuantizationReport(best.variant, _why(best, results, max_accuracy_drop), max_accuracy_drop, tuple(results))


def _points(fraction: float) -> str:
    return f"{fraction * 100:.2f} points"


def _why(best: VariantResult, results: list[VariantResult], max_accuracy_drop: float) -> str:
    others = [r for r in results if r.variant != "none"]
    if best.variant != "none":
        score = cast(VariantScore, best.score)
        return (
            f"{best.variant} is the fastest variant within the accuracy limit: {cast(float, best.speedup_b32):.2f}x "
            f"float speed at batch 32 ({score.latency_p50_ms_b32:.3f} ms p50), accuracy drop "
            f"{_points(cast(float, best.accuracy_drop))} <= {_points(max_accuracy_drop)}"
        )
    if not others:
        return "quantization type is none: only the float model was considered"
    parts = []
    for r in others:
        if not r.available:
            parts.append(f"{r.variant} unavailable ({r.reason})")
        elif not r.eligible:
            parts.append(f"{r.variant} lost too much accuracy ({r.reason})")
        else:
            parts.append(f"{r.variant} was not faster ({cast(float, r.speedup_b32):.2f}x float speed)")
    return "kept the float model: " + "; ".join(parts)


def quantize_and_select(
    model: nn.Module,
    *,
    kind: str,
    calibration: Iterable[torch.Tensor],
    evaluate: Callable[[nn.Module], VariantScore],
    max_accuracy_drop: float,
    calibration_batches: int = 16,
) -> QuantizationOutcome:
    """Builds the float model and the variant(s) `kind` names, scores each with `evaluate`, and keeps the
    fastest whose accuracy drop is within `max_accuracy_drop` (a fraction: 0.01 is one point), else the
    float model. Unavailable variants are reported with their reason, never faked."""
    variants = variants_for(kind)
    if calibration_batches < 1:
        raise InvalidInputError(f"calibration_batches must be >= 1 (got {calibration_batches})")
    if not (0.0 <= max_accuracy_drop <= 1.0):
        raise InvalidInputError(f"max_accuracy_drop must be a fraction in [0, 1] (got {max_accuracy_drop})")
    batches = list(itertools.islice(calibration, calibration_batches)) if len(variants) > 1 else []
    models: dict[Variant, nn.Module] = {}
    scores: dict[Variant, VariantScore] = {}
    unavailable: dict[Variant, str] = {}
    for variant in variants:
        try:
            candidate = quantize(model, variant, batches)
        except QuantizationUnavailableError as e:
            unavailable[variant] = e.message
            continue
        models[variant] = candidate
        scores[variant] = evaluate(candidate)
    report = select_variant(scores, unavailable, max_accuracy_drop)
    return QuantizationOutcome(models[report.chosen], report)


# ---------------------------------------------------------------- persistence


def _payload(model: nn.Module, variant: Variant) -> dict[str, Any]:
    state = model.state_dict()
    if variant == "fp16":
        state = _map_state(state, torch.float16)
    return {"format": FORMAT, "variant": variant, "engine": torch.backends.quantized.engine, "state": state}


def _map_state(state: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    mapped: dict[str, Any] = OrderedDict((key, _map_floats(value, dtype)) for key, value in state.items())
    # Per-module versions: without them quantized modules take the state for an old layout and misread it.
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        setattr(mapped, "_metadata", metadata)  # noqa: B010 (mypy does not know the attribute)
    return mapped


def _map_floats(value: Any, dtype: torch.dtype) -> Any:
    """Casts float tensors, including those inside packed-parameter tuples, to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and not value.is_quantized else value
    if isinstance(value, tuple):
        return tuple(_map_floats(item, dtype) for item in value)
    return value


def serialized_size(model: nn.Module, variant: Variant) -> int:
    """Bytes `save_quantized` would write for this model: the artifact's size, for evaluators."""
    buffer = io.BytesIO()
    torch.save(_payload(model, variant), buffer)
    return buffer.tell()


def save_quantized(model: nn.Module, variant: Variant, path: Path) -> SavedVariant:
    """Writes the variant's state (tensors and plain values only) atomically to `path`, and its sha256
    to `path` + `.sha256` (sha256sum format)."""
    if variant not in VARIANTS:
        raise InvalidInputError(f"quantization variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}")
    buffer = io.BytesIO()
    torch.save(_payload(model, variant), buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, data)
    _write_atomically(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n".encode())
    return SavedVariant(path, variant, digest, len(data))


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp_name).replace(path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def load_quantized(
    path: Path, build: Callable[[], nn.Module], variant: Variant, *, expected_sha256: str | None = None
) -> nn.Module:
    """Rebuilds the float skeleton with `build()`, applies the same transform as `quantize` (no
    calibration needed: the saved state holds the quantization parameters) and loads the state.

    Nothing pickled is executed (`torch.load(weights_only=True)`). The bytes are hashed and loaded from
    one read, so what was verified is what is loaded: ArtifactIntegrityError if they do not match
    `expected_sha256`.
    """
    if variant not in VARIANTS:
        raise InvalidInputError(f"quantization variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ArtifactNotFoundError(f"quantized model {path} does not exist") from e
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise ArtifactIntegrityError(
                f"quantized model {path} has sha256 {actual}, expected {expected_sha256}; refusing to load it"
            )
    try:
        with warnings.catch_warnings():
            # torch's own quantized-tensor rebuild touches TypedStorage and warns about it; not our call to fix.
            warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning)
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file, or one that needs code to unpickle: say which
        raise InvalidInputError(f"quantized model {path} cannot be loaded safely ({_first_line(e)})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidInputError(f"quantized model {path} is not a {FORMAT} file")
    if payload.get("variant") != variant:
        raise InvalidInputError(f"quantized model {path} holds variant {payload.get('variant')!r}, not {variant!r}")
    model = _transform(build(), variant, [])
    state = payload["state"]
    if not isinstance(state, dict):
        raise InvalidInputError(f"quantized model {path} has no state dictionary")
    if variant == "fp16":
        state = _map_state(state, torch.float32)
    expected = set(model.state_dict())
    if expected != set(state):
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise InvalidInputError(
            f"quantized model {path} does not fit the model build() returned: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        with _torch_ao_quiet():
            model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise InvalidInputError(
            f"quantized model {path} does not fit the model build() returned ({_first_line(e)})"
        ) from e
    return model.eval()
