"""What an int8 variant leaves float, stored small: the artifact's bytes, not what the graph computes.

After ONNX Runtime's quantizer has made the MatMul weights int8, a graph still holds float tables
(token embeddings, learned positions), vectors (biases, norm scales) and its own structure.
`compact` stores each float table (two dimensions above 1, read only by indexing and elementwise
operators) as int8 and a scale (one for a table only Gathers read, one per row otherwise), widened
by a Cast and a Mul that ORT folds at load; every other float tensor of 16 elements or more as half
behind a Cast that ORT folds at load too (`store_half`); and drops what the
runtime does not read: all-zero weight zero points, shape annotations (ORT infers shapes again), node names, long names
(initializers become `w<n>`, computed values `t<n>`; graph inputs and outputs keep theirs). The zoo
transformer's dynamic variant went from 2.91x to 3.55x smaller than the float model this way, at
no accuracy cost in bench/quantization.py. Weights keep the suffixes `ml/quantization/weights.py`
looks them up by (`_quantized`, `_scale` and the quantizer's `_zero_point` for int8, `.fp16` for half).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ml.quantization.onnx_graph import has_subgraphs

# fp16 leaves tiny tensors (scalars, norms' shapes) float: halving them saves nothing and costs a Cast each.
_FP16_MIN_ELEMENTS = 16
# A table is int8 from this size on: below it, the scale and the widening nodes outweigh what it saves.
_INT8_MIN_ELEMENTS = 256
# What reads a table (an embedding, a position table): elementwise and indexing operators. A weight of
# a compute operator (a Conv dynamic int8 leaves float) stays half: a DequantizeLinear in front of a
# Conv kept ORT from folding and re-laying out its weight at load (zoo CNN b32 0.59 vs 0.21 ms).
_TABLE_USES = frozenset({"Gather", "Add", "Sub", "Mul", "Div", "Slice", "Concat"})
# Integer kernels whose weight zero point (input 3) is optional and defaults to zero.
_ZERO_POINT_KERNELS = frozenset({"MatMulInteger", "ConvInteger"})
# How ONNX Runtime's quantizer and this module name a weight's stored forms (weights.py reads them so).
_SUFFIXES = ("_quantized", "_scale", "_zero_point", ".fp16")


def compact(graph: onnx.ModelProto, *, tables_int8: bool) -> dict[str, str]:
    """Stores, in place, the float tables int8 (when `tables_int8`) and the other float tensors half,
    and drops what the runtime does not read (shape annotations, node names, long names). Returns the
    weights' old base names -> new ones (`rename_weights` applies it to the weight map)."""
    # A subgraph (If, Loop) may read a table by name, which only the Gathers of the outer graph are
    # rewritten for: such graphs keep their tables half, as everything else.
    if tables_int8 and not has_subgraphs(graph.graph):
        store_int8_tables(graph)
    drop_zero_points(graph)
    store_half(graph)
    body = graph.graph
    del body.value_info[:]
    return _shorten_names(body)


def store_int8_tables(graph: onnx.ModelProto) -> int:
    """Each float initializer with two or more dimensions above 1 and `_INT8_MIN_ELEMENTS` elements as
    symmetric int8 and its scale, widened in front of the graph by a Cast to float and a Mul by the
    scale: constant inputs only, which ONNX Runtime folds once when the session loads (a
    DequantizeLinear it keeps for its QDQ fusions, and ran on every call). A table only Gathers read
    (an embedding) has one scale; any other (a position table) one per slice of its first dimension
    above 1 (`table_axis`). Only tables are stored so: tensors read by `_TABLE_USES` operators
    alone. Returns how many it stored."""
    body = graph.graph
    outputs = {output.name for output in body.output}
    inputs = {value.name for value in body.input}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in body.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    front: list[onnx.NodeProto] = []
    for tensor in list(body.initializer):
        dims = [int(d) for d in tensor.dims]
        if tensor.data_type != TensorProto.FLOAT or sum(d > 1 for d in dims) < 2 or np.prod(dims) < _INT8_MIN_ELEMENTS:
            continue
        uses = consumers.get(tensor.name, [])
        # an initializer that is also a graph input can be fed at run time: stored as it is
        if tensor.name in outputs | inputs or not uses or not all(node.op_type in _TABLE_USES for node, _ in uses):
            continue
        values = numpy_helper.to_array(tensor)
        rows_only = all(index == 0 and _is_gather(node) for node, index in uses)
        axis = None if rows_only else table_axis(values.shape)
        reduced = tuple(i for i in range(values.ndim) if i != axis)
        peak = np.abs(values).max(axis=reduced, keepdims=True)
        # shaped to broadcast against the table (one scale per slice of `axis`, or a scalar)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32).reshape(() if axis is None else peak.shape)
        name = tensor.name
        body.initializer.remove(tensor)
        body.initializer.extend(
            [
                numpy_helper.from_array(np.clip(np.rint(values / scale), -127, 127).astype(np.int8), _q(name)),
                numpy_helper.from_array(scale, f"{name}_scale"),
            ]
        )
        front.append(helper.make_node("Cast", [_q(name)], [f"{name}.int8_as_float"], to=TensorProto.FLOAT))
        front.append(helper.make_node("Mul", [f"{name}.int8_as_float", f"{name}_scale"], [name]))
    # In front of everything, so the graph stays topologically sorted.
    nodes = [*front, *body.node]
    del body.node[:]
    body.node.extend(nodes)
    return len(front) // 2


def table_axis(shape: tuple[int, ...] | list[int]) -> int:
    """The axis a table has one scale per slice of, unless only Gathers read it: its first above 1
    (a position table's positions). weights.py reads scales so."""
    return next(axis for axis, size in enumerate(shape) if size > 1)


def _is_gather(node: onnx.NodeProto) -> bool:
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx")


def _q(name: str) -> str:
    return f"{name}_quantized"


def drop_zero_points(graph: onnx.ModelProto) -> int:
    """Drops each int8 kernel's weight zero point that is all zeros (what symmetric int8 weights have):
    an optional input that defaults to zero, stored per weight for nothing. ORT fuses the kernels
    (DynamicQuantizeMatMul, MatMulIntegerToFloat) as before. Returns how many it dropped."""
    body = graph.graph
    stored = {tensor.name: tensor for tensor in body.initializer}
    dropped: set[str] = set()
    for node in body.node:
        # the weight's zero point is their fourth and last input
        if node.op_type not in _ZERO_POINT_KERNELS or node.domain not in ("", "ai.onnx") or len(node.input) != 4:
            continue
        zero = stored.get(node.input[3])
        if zero is not None and not numpy_helper.to_array(zero).any():
            dropped.add(node.input[3])
            del node.input[3]
    read = {name for node in body.node for name in node.input}
    unread = [stored[name] for name in dropped if name not in read]
    for tensor in unread:
        body.initializer.remove(tensor)
    return len(unread)


def store_half(graph: onnx.ModelProto) -> int:
    """Stores every float initializer of 16 elements or more as float16 behind a Cast to float, which
    ONNX Runtime constant-folds when the session loads: the graph computes in float as before, from
    weights rounded to half. The int8 variants use it for what they leave float (biases, norms), the
    fp16 variant for everything. Returns how many tensors it halved."""
    body = graph.graph
    # A scale stays float: DequantizeLinear or a table's Mul reads it, and so does weights.py.
    scales = {node.input[1] for node in body.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")}
    stored = {tensor.name for tensor in body.initializer}
    scales |= {f"{name[: -len('_quantized')]}_scale" for name in stored if name.endswith("_quantized")}
    inputs = {value.name for value in body.input}  # an initializer fed at run time keeps its type
    casts: list[onnx.NodeProto] = []
    for tensor in list(body.initializer):
        if tensor.data_type != TensorProto.FLOAT or int(np.prod(tensor.dims)) < _FP16_MIN_ELEMENTS:
            continue
        if tensor.name in inputs:
            continue
        if tensor.name in scales:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), f"{tensor.name}.fp16")
        body.initializer.remove(tensor)
        body.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [tensor.name], to=TensorProto.FLOAT))
    nodes = casts + list(body.node)
    del body.node[:]
    body.node.extend(nodes)
    return len(casts)


def _shorten_names(body: onnx.GraphProto) -> dict[str, str]:
    """Node names off, every value computed inside the graph renamed `t<n>` and every initializer
    `w<n>` plus its suffix (`_quantized`, `.fp16`, ...); the graph's inputs and outputs keep their
    names. Returns the initializers' old base names and whole names -> new ones, for the weight map
    (a float weight whose own name ends like a suffix, `logit_scale`, is found by its whole name)."""
    if has_subgraphs(body):
        return {}  # a subgraph may read the outer graph's values by name
    io = {value.name for value in (*body.input, *body.output)}
    if any(re.fullmatch(r"[tw]\d+", name) for name in io):
        return {}  # a new name could be taken by an input or output
    bases: dict[str, str] = {}
    renamed: dict[str, str] = {}
    for tensor in body.initializer:
        if tensor.name in io:
            continue
        base, suffix = _split_suffix(tensor.name)
        renamed[tensor.name] = bases.setdefault(base, f"w{len(bases)}") + suffix
        tensor.name = renamed[tensor.name]
    weights = {**renamed, **bases}  # a base name wins: the weight map names a quantized weight by its base
    for node in body.node:
        node.name = ""
        for index, name in enumerate(node.output):
            if name and name not in io:
                renamed.setdefault(name, f"t{len(renamed)}")
                node.output[index] = renamed[name]
    for node in body.node:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
    return weights


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""
