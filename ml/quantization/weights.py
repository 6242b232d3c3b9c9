"""The float weights inside a quantized variant, under the float model's state-dict keys.

A run that starts from its champion's weights (ml/init_weights.py) needs them even when the champion
was saved as an ONNX variant. At quantization time `weight_map` finds, for each float tensor of the
model, the graph initializer holding the same values (the exporter renames and transposes MatMul
weights, so they are matched by value, not by name); the map travels in the graph's metadata.
`float_weights` reads them back: as they are, widened from half, or dequantized from int8.
"""

from __future__ import annotations

import hashlib
import json
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
    """JSON {state-dict key: [initializer name, transposed]} for every float tensor of `model` that
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


def rename_weights(weights: str, renamed: dict[str, str]) -> str:
    """The weight map with its initializer names renamed (old -> new; others kept)."""
    found = json.loads(weights)
    for entry in found.values():
        entry[0] = renamed.get(entry[0], entry[0])
    return json.dumps(found, sort_keys=True, separators=(",", ":"))


def float_weights(graph_bytes: bytes, *, source: str) -> dict[str, torch.Tensor]:
    """float32 tensors under the float model's keys, from a quantized variant's ONNX graph."""
    graph = onnx.load_model_from_string(graph_bytes)
    props = {entry.key: entry.value for entry in graph.metadata_props}
    if WEIGHTS_KEY not in props:
        raise InvalidInputError(f"{source} does not record where its float weights are; retrain it to start from it")
    tensors = {tensor.name: tensor for tensor in graph.graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for key, (name, transposed, shape) in json.loads(props[WEIGHTS_KEY]).items():
        array = _recover(tensors, name)
        if array is None:
            continue  # folded into another tensor by the exporter (a batch norm into its conv): not recoverable
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
    if quantized is None or scale is None or zero is None:
        return None
    values = numpy_helper.to_array(quantized).astype(np.float32)
    scales, zeros = (numpy_helper.to_array(t).astype(np.float32) for t in (scale, zero))
    if scales.size > 1:  # one scale per slice of a table's axis (compact.table_axis)
        shape = [1] * values.ndim
        shape[table_axis(values.shape)] = scales.size
        scales, zeros = scales.reshape(shape), zeros.reshape(shape)
    return (values - zeros) * scales
