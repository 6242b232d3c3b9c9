"""The float weights inside a quantized variant, under the float model's state-dict keys.

A run that starts from its champion's weights (ml/init_weights.py) needs them even when the champion
was saved as an ONNX variant. At quantization time `weight_map` finds, for each float tensor of the
model, the graph initializer holding the same values (the exporter renames and transposes MatMul
weights, so they are matched by value, not by name), or the parts it was later split into
(`rename_weights`); the map travels in the graph's metadata. A graph rewritten by
ml/quantization/prenorm.py holds an equivalent form of some weights (centred, a norm's bias folded
into the next projections and recorded as zeros): the same function, not the trained tensors.
`float_weights` reads them back: as they are, widened from half, or dequantized from int8.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from domain.errors import InvalidInputError
from ml.quantization.compact import table_axis

WEIGHTS_KEY = "retrainer.weights"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def weight_map(model: nn.Module, graph: onnx.ModelProto) -> str:
    """JSON {state-dict key: [initializer name, transposed, shape]} for every float tensor of `model` that
    the float graph holds as an initializer (as is, or transposed)."""
    # Keyed by the bytes alone: the exporter may add or drop unit dimensions, and a transposed copy
    # has other bytes anyway.
    by_value: dict[str, str] = {}
    for tensor in graph.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            by_value.setdefault(_digest(numpy_helper.to_array(tensor)), tensor.name)
    found: dict[str, list[Any]] = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        array = value.detach().cpu().float().numpy()
        for candidate, transposed in ((array, False), *([(array.T, True)] if array.ndim == 2 else [])):
            name = by_value.get(_digest(candidate))
            if name is not None:
                found[key] = [name, transposed, list(value.shape)]
                break
    return json.dumps(found, sort_keys=True, separators=(",", ":"))


def rename_weights(weights: str, renamed: Mapping[str, str | list[str] | None]) -> str:
    """The weight map with its initializer names renamed (old -> new; others kept). A name may become
    a list: the parts that, concatenated along their last axis, hold the weight (fusion.py splits a
    packed q/k/v projection so); each part is renamed as a name. A name renamed to None is a weight
    the graph no longer stores because it is zeros (prenorm.py folds norm biases away)."""
    found = json.loads(weights)
    for entry in found.values():
        if entry[0] is None:
            continue
        names = entry[0] if isinstance(entry[0], list) else [entry[0]]
        new = [renamed.get(name, name) for name in names]
        if any(name is None for name in new):
            entry[0] = None
            continue
        flat = [part for name in new if name is not None for part in ([name] if isinstance(name, str) else name)]
        entry[0] = flat if isinstance(entry[0], list) or len(flat) > 1 else flat[0]
    return json.dumps(found, sort_keys=True, separators=(",", ":"))


def float_weights(graph_bytes: bytes, *, source: str) -> dict[str, torch.Tensor]:
    """float32 tensors under the float model's keys, from a quantized variant's ONNX graph."""
    graph = onnx.load_model_from_string(graph_bytes)
    props = {entry.key: entry.value for entry in graph.metadata_props}
    if WEIGHTS_KEY not in props:
        raise InvalidInputError(f"{source} does not record where its float weights are; retrain it to start from it")
    tensors = {tensor.name: tensor for tensor in graph.graph.initializer}
    # Static int8 stores a bias as int32 under the scale its DequantizeLinear names (input x weight scale).
    for node in graph.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith("_quantized") and node.input[1] in tensors:
            base = node.input[0][: -len("_quantized")]
            tensors.setdefault(f"{base}_scale", tensors[node.input[1]])
            if len(node.input) > 2 and node.input[2] in tensors:
                tensors.setdefault(f"{base}_zero_point", tensors[node.input[2]])
    state: dict[str, torch.Tensor] = {}
    for key, (names, transposed, shape) in json.loads(props[WEIGHTS_KEY]).items():
        if names is None:
            state[key] = torch.zeros(shape)
            continue
        recovered = [_recover(tensors, name) for name in ([names] if isinstance(names, str) else names)]
        arrays = [array for array in recovered if array is not None]
        if len(arrays) != len(recovered):
            continue  # folded into another tensor by the exporter (a batch norm into its conv): not recoverable
        array = np.concatenate(arrays, axis=-1) if len(arrays) > 1 else arrays[0]
        if transposed:
            array = array.reshape(shape[::-1]).T
        state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(shape)
    return state


def _recover(tensors: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    if name in tensors:
        return numpy_helper.to_array(tensors[name]).astype(np.float32)
    if f"{name}.fp16" in tensors:
        return numpy_helper.to_array(tensors[f"{name}.fp16"]).astype(np.float32)
    quantized, scale, zero = (tensors.get(f"{name}_{suffix}") for suffix in ("quantized", "scale", "zero_point"))
    if quantized is None or scale is None:
        return None
    values = numpy_helper.to_array(quantized).astype(np.float32)
    scales = numpy_helper.to_array(scale).astype(np.float32)
    # compact.py's tables are symmetric and have no zero point; the quantizer's weights (and tables
    # stored before) have one
    zeros = np.zeros_like(scales) if zero is None else numpy_helper.to_array(zero).astype(np.float32)
    if scales.size > 1:  # one scale per slice of a table's axis (compact.table_axis)
        shape = [1] * values.ndim
        shape[table_axis(values.shape)] = scales.size
        scales, zeros = scales.reshape(shape), zeros.reshape(shape)
    return (values - zeros) * scales
