"""How each variant is built from a float model (`quantize`), and each one's limits.

`dynamic`: int8 weights for nn.Linear, activations quantized per call. `static`: int8 weights and
activations calibrated on sample batches, with the zoo's ResidualCNN made quant-ready (conv+bn+relu
fused, the residual add through FloatFunctional). `fp16`: weights rounded to half and served by
fbgemm's fp16-weight GEMM. The transformer's encoder layers are swapped first
(ml/quantization/attention.py). Why these backends: the measurements in ml/quantization/__init__.py.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import nn
from torch.ao import quantization as ao_quant
from torch.ao.nn.quantized import FloatFunctional

from domain.errors import InvalidInputError
from ml.quantization.attention import swap_encoder_layers
from ml.quantization.variants import (
    QuantizationUnavailableError,
    Variant,
    check_variant,
    first_line,
    torch_ao_quiet,
)
from ml.zoo import ResidualCNN, _ResidualBlock


def _dynamic_int8(model: nn.Module) -> nn.Module:
    swap_encoder_layers(model)
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
    with torch_ao_quiet():
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
                f"static int8 does not run on {type(model).__name__}: {first_line(e)} (eager-mode static "
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
    # what is stored, and storing half (ml/quantization/persistence.py) then loading loses nothing further.
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half())
    swap_encoder_layers(model)
    if not any(type(m) is nn.Linear for m in model.modules()):
        return model  # nothing for the fp16 GEMM; the artifact is still stored half
    # fbgemm's fp16 GEMM: weights packed half, activations and accumulation float (no fp16 ALUs here).
    return _quantize_linear_layers(model, torch.float16)


def _quantize_linear_layers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    with torch_ao_quiet():
        quantized = ao_quant.quantize_dynamic(model, {nn.Linear}, dtype=dtype, inplace=True)  # type: ignore[no-untyped-call]
    return cast(nn.Module, quantized)


def quantize(model: nn.Module, variant: Variant, calibration: Iterable[torch.Tensor] = ()) -> nn.Module:
    """A CPU copy of `model` (never modified) transformed into `variant`.

    `static` calibrates its activation ranges over every batch in `calibration` (take as many as the
    spec's calibration_batches); the other variants use the first batch, if any, to check they run.
    QuantizationUnavailableError says why a variant cannot be applied to this architecture.
    """
    check_variant(variant)
    batches = [_check_batch(batch, index) for index, batch in enumerate(calibration)]
    if variant == "static" and not batches:
        raise InvalidInputError("static quantization needs at least one calibration batch")
    return apply_variant(model, variant, batches)


def quantize_each(
    model: nn.Module, variants: Sequence[Variant], calibration: list[torch.Tensor]
) -> tuple[dict[Variant, nn.Module], dict[Variant, str]]:
    """`quantize` for each variant in turn: the ones built, in the order asked, and for each variant
    this architecture cannot take, the reason (QuantizationUnavailableError's message)."""
    built: dict[Variant, nn.Module] = {}
    unavailable: dict[Variant, str] = {}
    for variant in variants:
        try:
            built[variant] = quantize(model, variant, calibration)
        except QuantizationUnavailableError as e:
            unavailable[variant] = e.message
    return built, unavailable


def apply_variant(model: nn.Module, variant: Variant, batches: list[torch.Tensor]) -> nn.Module:
    """The transform itself, on a CPU copy of `model`, for `quantize` and for the loader."""
    # Without batches (the loader's case) static int8 gets placeholder qparams that the saved state replaces.
    working = copy.deepcopy(model).cpu().eval()
    if variant == "none":
        return working
    if variant == "static":
        return _static_int8(working, batches)
    result = _dynamic_int8(working) if variant == "dynamic" else _fp16(working)
    if batches:
        try:
            with torch.inference_mode(), torch_ao_quiet():
                result(batches[0][:2])
        except (RuntimeError, NotImplementedError) as e:
            raise QuantizationUnavailableError(
                f"{variant} does not run on {type(model).__name__} with the {torch.backends.quantized.engine} "
                f"quantized engine: {first_line(e)}"
            ) from e
    return result.eval()


def _check_batch(batch: object, index: int) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or batch.dim() < 2:
        described = (
            f"{batch.dtype} tensor of shape {list(batch.shape)}"
            if isinstance(batch, torch.Tensor)
            else type(batch).__name__
        )
        raise InvalidInputError(f"calibration batch {index} must be a float tensor [batch, ...] (got {described})")
    return batch.detach().cpu()
