"""How each variant is built from a float model (`quantize`), and each one's limits.

`none` is the float torch model. The others are the float model exported to ONNX
(ml/quantization/onnx_graph.py) and transformed by ONNX Runtime's tools: `dynamic` is
`quantize_dynamic` (int8 weights, activations quantized per call), `static` is `quantize_static`
calibrated on sample batches, `fp16` stores every float weight as half and widens it once when
the session loads. The transformer's encoder layers are swapped first (ml/quantization/attention.py)
so that their projections export as plain MatMuls int8 can reach, and each exported attention block
becomes ONNX's Attention on 3-D inputs over its projections (ml/quantization/fusion.py). A pre-norm
transformer's LayerNorms run as RMSNormalization where that is exact (ml/quantization/prenorm.py).
What int8 leaves float is stored small (ml/quantization/compact.py). Each option below was picked
by measuring (the figures are in ml/quantization/__init__.py).
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from torch import nn

from domain.errors import InvalidInputError
from ml.quantization.attention import swap_encoder_layers
from ml.quantization.compact import compact, store_half
from ml.quantization.fusion import fuse_attention, replace_nodes
from ml.quantization.onnx_graph import INPUT, ExportError, OnnxModule, export_onnx, quiet_loggers
from ml.quantization.prenorm import rms_norms
from ml.quantization.variants import (
    ONNX_FORMAT,
    QuantizationUnavailableError,
    Variant,
    check_variant,
    first_line,
)
from ml.quantization.weights import WEIGHTS_KEY, rename_weights, weight_map

# Operators whose presence shows that int8 reached the graph (QOperator kernels, or the QDQ pairs
# that ONNX Runtime fuses into them when it loads the session).
_INT8_OPERATORS = frozenset(
    {
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "ConvInteger",
        "QLinearMatMul",
        "QLinearConv",
        "QGemm",
        "QAttention",
        "QuantizeLinear",
    }
)


def skeleton_signature(model: nn.Module) -> str:
    """A digest of the float model's state-dict keys and shapes: what a loader's build() must match."""
    described = "\n".join(f"{key}:{list(value.shape)}" for key, value in sorted(model.state_dict().items()))
    return hashlib.sha256(described.encode()).hexdigest()


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def quantizer_quiet() -> AbstractContextManager[None]:
    # onnxruntime.quantization logs a "consider pre-processing" tip on the root logger on every call.
    return quiet_loggers("")


class _Batches(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self._feeds = iter([{INPUT: batch.numpy().astype(np.float32)} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _dynamic_int8(graph: onnx.ModelProto, folder: Path, _: list[torch.Tensor]) -> onnx.ModelProto:
    # The graph's Gemms are already MatMuls (gemm_as_matmul, in quantize). Measured (MLP 1024x1024,
    # b32): signed int8 weights 0.151 ms, unsigned 0.202 ms; per-channel 0.168 ms for no accuracy gain
    # at these widths; reduce_range changes nothing on VNNI: all off. Conv stays float: ORT's
    # ConvInteger made the zoo CNN 27x slower (6.0 ms vs 0.22 ms at b32); MatMul is where int8 pays.
    # Attention stays float (ONNX's own operator; fusion.py leaves its qkv projection a MatMul, which
    # is quantized here). The quantizer matches op types by name, and ONNX's Attention named in
    # op_types_to_quantize would become a QAttention ORT cannot load: only MatMul is named.
    source, target = folder / "float.onnx", folder / "dynamic.onnx"
    onnx.save_model(graph, source)
    with quantizer_quiet():
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=False,
            op_types_to_quantize=["MatMul"],
        )
    return onnx.load_model(target)


def gemm_as_matmul(graph: onnx.ModelProto) -> onnx.ModelProto:
    """Each plain Gemm over a weight (how the exporter writes a 2-D nn.Linear) as MatMul + Add:
    dynamic quantization has int8 kernels for MatMul only, so a Gemm would stay float."""
    body = graph.graph
    weights = {tensor.name: tensor for tensor in body.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in body.node:
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        plain = (
            attributes.get("alpha", 1.0) == 1.0 and attributes.get("beta", 1.0) == 1.0 and not attributes.get("transA")
        )
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        weight = weight.T if attributes.get("transB") else weight
        name = f"{node.input[1]}.matmul"
        body.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}.product" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
    replace_nodes(body, nodes)
    return graph


def _static_int8(graph: onnx.ModelProto, folder: Path, batches: list[torch.Tensor]) -> onnx.ModelProto:
    # QDQ: ONNX Runtime fuses each QuantizeLinear/DequantizeLinear pair with its operator when the
    # session loads, and keeps float what has no int8 kernel instead of failing on it. The node that
    # writes the model's output stays float: quantizing the output itself rounds every prediction to
    # one of 256 levels over the calibration range (0.07 RMSE on a target of scale 3, measured).
    source, target = folder / "float.onnx", folder / "static.onnx"
    outputs = {output.name for output in graph.graph.output}
    last = [node.name for node in graph.graph.node if set(node.output) & outputs]
    onnx.save_model(graph, source)
    with quantizer_quiet():
        quantize_static(
            source,
            target,
            _Batches(batches),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,
            nodes_to_exclude=last,
        )
    return onnx.load_model(target)


def _fp16(graph: onnx.ModelProto, _: Path, __: list[torch.Tensor]) -> onnx.ModelProto:
    # Stored half, computed float: this CPU has no fp16 arithmetic (model.half() measured 0.12-0.40x
    # float), so the running graph is the float one and the artifact about half its size.
    if not store_half(graph):
        raise QuantizationUnavailableError("fp16 found no float weights of 16 elements or more to store half")
    return graph


_BUILDERS = {"dynamic": _dynamic_int8, "static": _static_int8, "fp16": _fp16}


def quantize(model: nn.Module, variant: Variant, calibration: Iterable[torch.Tensor] = ()) -> nn.Module:
    """A CPU copy of `model` (never modified) transformed into `variant`.

    `static` calibrates its activation ranges over every batch in `calibration` (take as many as the
    spec's calibration_batches); the other variants export with the first batch, if any, and check
    that the result runs on it. QuantizationUnavailableError says why a variant cannot be applied.
    """
    check_variant(variant)
    batches = [_check_batch(batch, index) for index, batch in enumerate(calibration)]
    if variant == "static" and not batches:
        raise InvalidInputError("static quantization needs at least one calibration batch")
    working = copy.deepcopy(model).cpu().eval()
    if variant == "none":
        return working
    # Two rows: torch.export specialises a dimension traced at size 1, and the batch axis must stay dynamic.
    example = batches[0][:2] if batches else _example_input(working, variant)
    example = example if example.shape[0] >= 2 else torch.cat([example, example])
    swap_encoder_layers(working)
    try:
        graph = export_onnx(working, example)
    except ExportError as e:
        raise QuantizationUnavailableError(f"{variant} needs an ONNX export, and {e}") from e
    if variant == "dynamic":
        graph = gemm_as_matmul(graph)
    # Every variant: each attention block as ONNX's Attention over its projections
    # (ml/quantization/fusion.py), standard operators, so int8 (dynamic and static alike) reaches the
    # projections. Dynamic int8 takes q, k, v as three projections, one quantization of their input
    # (zoo transformer b32 1.20 vs 1.22 ms with a Split); static and fp16 keep one packed projection and
    # a Split (static 1.72 vs 1.78 ms, fp16 alike and smaller). The weights are found before, where the
    # packed projection is still whole.
    weights = weight_map(model, graph)
    weights = rename_weights(weights, fuse_attention(graph, separate=variant == "dynamic"))
    # Pre-norm residual streams centred and their norms as RMSNormalization where exact
    # (ml/quantization/prenorm.py); the norm biases it folds away are zeros in the float weights.
    weights = rename_weights(weights, rms_norms(graph))
    with tempfile.TemporaryDirectory(prefix="retrainer-quantize-") as folder:
        try:
            transformed = _BUILDERS[variant](graph, Path(folder), batches)
        except QuantizationUnavailableError:
            raise
        except Exception as e:  # ONNX Runtime's tools fail in many ways on graphs they do not cover
            raise QuantizationUnavailableError(
                f"{variant} failed in ONNX Runtime's quantization tools on {type(model).__name__}: {first_line(e)}"
            ) from e
    if variant != "fp16" and not any(node.op_type in _INT8_OPERATORS for node in transformed.graph.node):
        raise QuantizationUnavailableError(
            f"{variant} int8 found nothing to quantize in {type(model).__name__} (no MatMul, Gemm or Conv weights)"
        )
    renamed = compact(transformed, tables_int8=variant != "fp16")
    _stamp(transformed, variant, model, rename_weights(weights, renamed))
    quantized = OnnxModule(transformed.SerializeToString(), variant=variant, parameter_count=parameter_count(model))
    try:
        with torch.inference_mode():
            quantized(example)
    except Exception as e:  # a graph ONNX Runtime cannot run is unavailable, with ORT's reason
        raise QuantizationUnavailableError(
            f"{variant} does not run on {type(model).__name__} in ONNX Runtime: {first_line(e)}"
        ) from e
    return quantized.eval()


def _stamp(graph: onnx.ModelProto, variant: Variant, model: nn.Module, weights: str) -> None:
    """What the loader checks before it builds a session (format, variant, the float skeleton), and
    where the float weights are (ml/quantization/weights.py)."""
    values = {
        "retrainer.format": ONNX_FORMAT,
        "retrainer.variant": variant,
        "retrainer.skeleton": skeleton_signature(model),
        "retrainer.parameter_count": str(parameter_count(model)),
        WEIGHTS_KEY: weights,
    }
    onnx.helper.set_model_props(graph, values)


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


def _example_input(model: nn.Module, variant: Variant) -> torch.Tensor:
    """Two rows the exporter can trace with, when the caller passed no batch: from the model's own
    `input_shape` (the zoo's CNN), or from the width of its first layer when that is an nn.Linear."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, Sequence) and shape and all(isinstance(size, int) for size in shape):
        return torch.zeros(2, *shape)
    first = next((m for m in model.modules() if not list(m.children())), None)
    if isinstance(first, nn.Linear):
        return torch.zeros(2, first.in_features)
    raise InvalidInputError(
        f"{variant} exports {type(model).__name__} to ONNX and needs an example of its input; "
        "pass one calibration batch"
    )


def _check_batch(batch: object, index: int) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or batch.dim() < 2:
        described = (
            f"{batch.dtype} tensor of shape {list(batch.shape)}"
            if isinstance(batch, torch.Tensor)
            else type(batch).__name__
        )
        raise InvalidInputError(f"calibration batch {index} must be a float tensor [batch, ...] (got {described})")
    return batch.detach().cpu().float()
