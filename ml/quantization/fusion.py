"""The exported self-attention blocks as ONNX Runtime's fused `com.microsoft.Attention` operator.

torch.onnx writes each `_ProjectedSelfAttention` (ml/quantization/attention.py) as a projection
MatMul + bias Add, a Reshape to [batch, length, 3, heads, head_size], a 5-D Transpose, three Gathers,
ONNX's Attention over [batch, heads, length, head_size], and a Transpose + Reshape back. On 2 CPU
cores the copies alone (Transpose, Gather) took half of the zoo transformer's time in ONNX Runtime.
ORT's contrib Attention takes the block's input [batch, length, hidden], the projection weight and
bias, and does projection, heads and softmax in one kernel with no copies; `quantize_dynamic` turns
it into QAttention (int8 projection), the operator ORT's own transformer tools produce. This is the
attention fusion of `onnxruntime.transformers` done on the dynamo exporter's pattern, which that
optimizer does not recognise. A block that does not match exactly (a mask, causal attention, another
layout) is left as exported: fusion is an optimisation, never a requirement.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
_Q_K_V = (0, 1, 2)


def fuse_attention(graph: onnx.ModelProto) -> int:
    """Rewrites, in place, each exported self-attention block into one com.microsoft.Attention node.
    Returns how many blocks it fused."""
    body = graph.graph
    initializers = {tensor.name: tensor for tensor in body.initializer}
    producer = {output: node for node in body.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in body.node:
        for name in node.input:
            consumers[name].append(node)
    replaced: dict[int, onnx.NodeProto] = {}  # id(the ONNX Attention node) -> its fused replacement
    removed: set[int] = set()
    for attention in [node for node in body.node if node.op_type == "Attention" and node.domain in ("", "ai.onnx")]:
        match = _match_block(attention, producer, consumers, initializers)
        if match is None:
            continue
        fused, block = match
        replaced[id(attention)] = fused
        removed.update(id(node) for node in block)
    if not replaced:
        return 0
    nodes = [replaced.get(id(node), node) for node in body.node if id(node) in replaced or id(node) not in removed]
    del body.node[:]
    body.node.extend(nodes)
    if not any(opset.domain == MS_DOMAIN for opset in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    used = {name for node in body.node for name in node.input}
    kept = [tensor for tensor in body.initializer if tensor.name in used]
    del body.initializer[:]
    body.initializer.extend(kept)
    return len(replaced)


def _match_block(
    attention: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    consumers: dict[str, list[onnx.NodeProto]],
    initializers: dict[str, onnx.TensorProto],
) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The fused node and the nodes it replaces, or None unless the block is exactly the exporter's
    unmasked, non-causal pattern with every intermediate used only inside the block."""
    attributes = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    if len(attention.input) != 3 or len(attention.output) != 1 or attributes.get("is_causal", 0):
        return None
    if attributes.get("softcap", 0.0) or attributes.get("qk_matmul_output_mode", 0):
        return None
    gathers = [producer.get(name) for name in attention.input]
    if any(g is None or g.op_type != "Gather" for g in gathers):
        return None
    selects = [g for g in gathers if g is not None]
    permute = producer.get(selects[0].input[0])
    if permute is None or permute.op_type != "Transpose" or {g.input[0] for g in selects} != {permute.output[0]}:
        return None
    if _ints(permute, "perm") != [2, 0, 3, 1, 4] or [_scalar(g.input[1], initializers) for g in selects] != list(
        _Q_K_V
    ):
        return None
    reshape = producer.get(permute.input[0])
    shape = _constant(reshape.input[1], initializers) if reshape is not None and reshape.op_type == "Reshape" else None
    if reshape is None or shape is None or len(shape) != 5 or shape[2] != 3:
        return None
    bias_add = producer.get(reshape.input[0])
    projection = producer.get(bias_add.input[0]) if bias_add is not None and bias_add.op_type == "Add" else None
    if bias_add is None or projection is None or projection.op_type != "MatMul":
        return None
    weight, bias = initializers.get(projection.input[1]), initializers.get(bias_add.input[1])
    heads, head_size = int(shape[3]), int(shape[4])
    if weight is None or bias is None or list(weight.dims) != [heads * head_size, 3 * heads * head_size]:
        return None
    back = consumers.get(attention.output[0], [])
    if len(back) != 1 or back[0].op_type != "Transpose" or _ints(back[0], "perm") != [0, 2, 1, 3]:
        return None
    merge = consumers.get(back[0].output[0], [])
    if len(merge) != 1 or merge[0].op_type != "Reshape":
        return None
    block = [projection, bias_add, reshape, permute, *selects, attention, back[0], merge[0]]
    inner = {output for node in block for output in node.output} - set(merge[0].output)
    outside = [c for name in inner for c in consumers.get(name, []) if all(c is not node for node in block)]
    if outside:
        return None
    fused = helper.make_node(
        "Attention",
        [projection.input[0], projection.input[1], bias_add.input[1]],
        list(merge[0].output),
        name=f"{attention.name or merge[0].output[0]}.fused",
        domain=MS_DOMAIN,
        num_heads=heads,
    )
    if "scale" in attributes:  # both operators default to 1/sqrt(head_size); carry an explicit one over
        fused.attribute.append(helper.make_attribute("scale", float(attributes["scale"])))
    return fused, block


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == name:
            return list(attribute.ints)
    return None


def _constant(name: str, initializers: dict[str, onnx.TensorProto]) -> list[int] | None:
    tensor = initializers.get(name)
    return None if tensor is None else [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]


def _scalar(name: str, initializers: dict[str, onnx.TensorProto]) -> int | None:
    values = _constant(name, initializers)
    return values[0] if values is not None and len(values) == 1 else None
