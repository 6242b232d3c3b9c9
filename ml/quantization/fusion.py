"""Each exported self-attention block as ONNX's Attention on 3-D inputs over its projections.

torch.onnx writes each `_ProjectedSelfAttention` (ml/quantization/attention.py) as a projection
MatMul + bias Add, a Reshape to [batch, length, 3, heads, head_size], a 5-D Transpose, three Gathers,
ONNX's Attention over [batch, heads, length, head_size], and a Transpose + Reshape back. On 2 CPU
cores those copies took half of the zoo transformer's time in ONNX Runtime. ONNX's Attention also
takes q, k and v as [batch, length, heads * head_size] (its `q_num_heads` / `kv_num_heads`
attributes) and returns that layout, so the block becomes its projection and one Attention, only
ONNX's own operators, in one of two forms (transforms.py picks per variant, by measurement):
three projections (MatMul + Add over a third of the packed weight's columns each; dynamic int8
quantizes their shared input once, one DynamicQuantizeLinear that ORT keeps shared by three
MatMulIntegerToFloat), or the packed projection and a Split in three (which copies its output:
1.5 MB per block in the zoo transformer at batch 32). Measured against ONNX Runtime's contrib
Attention (which quantize_dynamic makes a QAttention; the first form of this fusion) on the zoo
transformer's block at batch 32: 0.52 vs 1.20 ms on one thread, 0.48 vs 0.61 ms on two. ORT's
transformer optimizer does not recognise the dynamo exporter's pattern at all. A mask and the
causal flag carry over unchanged. A block that does not match exactly (separate q/k/v projections,
a key/value cache, another layout) is left as exported: fusion is an optimisation, never a
requirement.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

_Q_K_V = (0, 1, 2)


def fuse_attention(graph: onnx.ModelProto, *, separate: bool) -> dict[str, list[str]]:
    """Rewrites, in place, each exported self-attention block into ONNX Attention on 3-D inputs fed by
    q, k and v projections (`separate`) or by one packed projection and a Split. Returns each
    initializer it split (a packed projection's weight and bias) -> its q, k and v parts, which
    concatenated along their last axis are it (weights.py reads them back so)."""
    body = graph.graph
    initializers = {tensor.name: tensor for tensor in body.initializer}
    producer = {output: node for node in body.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in body.node:
        for name in node.input:
            consumers[name].append(node)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(the exported Attention node) -> what replaces it
    removed: set[int] = set()
    parts: dict[str, list[str]] = {}
    for attention in [node for node in body.node if node.op_type == "Attention" and node.domain in ("", "ai.onnx")]:
        block = _match_block(attention, producer, consumers, initializers)
        if block is None:
            continue
        replaced[id(attention)] = _rewrite(block, initializers, parts, body) if separate else _packed(block)
        removed.update(id(node) for node in block.nodes)
    if not replaced:
        return {}
    nodes: list[onnx.NodeProto] = []
    for node in body.node:
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
        elif id(node) not in removed:
            nodes.append(node)
    replace_nodes(body, nodes)
    # The rewritten outputs have other shapes than the exporter recorded (3-D instead of 5-D / 4-D).
    del body.value_info[:]
    return parts


def replace_nodes(body: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """The graph's nodes replaced by `nodes` (in that order), and the initializers none of them reads dropped."""
    del body.node[:]
    body.node.extend(nodes)
    used = {name for node in body.node for name in node.input}
    kept = [tensor for tensor in body.initializer if tensor.name in used]
    del body.initializer[:]
    body.initializer.extend(kept)


@dataclass(frozen=True)
class _Block:
    """One exported self-attention block: what its fused form needs, and every node it replaces."""

    source: str  # the projection's input
    weight: str  # [width, 3 * width], q | k | v along its columns
    bias: str  # [3 * width]
    heads: int
    attention: onnx.NodeProto
    output: str  # what the block's last Reshape wrote
    nodes: list[onnx.NodeProto]


def _rewrite(
    block: _Block, initializers: dict[str, onnx.TensorProto], parts: dict[str, list[str]], body: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """Three projections (MatMul + Add over a third of the weight's columns and of the bias) feeding one
    Attention on 3-D inputs. A weight or bias that two blocks share is split once."""
    for name in (block.weight, block.bias):
        if name not in parts:
            parts[name] = [f"{name}.{part}" for part in "qkv"]
            thirds = np.split(numpy_helper.to_array(initializers[name]), 3, axis=-1)
            body.initializer.extend(
                numpy_helper.from_array(np.ascontiguousarray(third), part)
                for third, part in zip(thirds, parts[name], strict=True)
            )
    name = block.attention.name or block.output
    nodes: list[onnx.NodeProto] = []
    for index, part in enumerate("qkv"):
        product = f"{name}.{part}.product"
        nodes.append(helper.make_node("MatMul", [block.source, parts[block.weight][index]], [product]))
        nodes.append(helper.make_node("Add", [product, parts[block.bias][index]], [f"{name}.{part}"]))
    return [*nodes, _attention(block, name)]


def _packed(block: _Block) -> list[onnx.NodeProto]:
    """The packed projection (MatMul + Add) and a Split in three feeding one Attention on 3-D inputs."""
    name = block.attention.name or block.output
    product, packed = f"{name}.qkv.product", f"{name}.qkv"
    return [
        helper.make_node("MatMul", [block.source, block.weight], [product]),
        helper.make_node("Add", [product, block.bias], [packed]),
        helper.make_node("Split", [packed], [f"{name}.{part}" for part in "qkv"], axis=-1, num_outputs=3),
        _attention(block, name),
    ]


def _attention(block: _Block, name: str) -> onnx.NodeProto:
    """ONNX Attention over `name`.q, .k and .v [batch, length, heads * head_size]."""
    # The mask, is_causal, scale and softcap mean the same on 3-D inputs: carried over as they are.
    fused = helper.make_node(
        "Attention",
        [f"{name}.{part}" for part in "qkv"] + list(block.attention.input[3:]),
        [block.output],
        name=f"{name}.3d",
        q_num_heads=block.heads,
        kv_num_heads=block.heads,
    )
    fused.attribute.extend(a for a in block.attention.attribute if a.name not in ("q_num_heads", "kv_num_heads"))
    return fused


def _match_block(
    attention: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    consumers: dict[str, list[onnx.NodeProto]],
    initializers: dict[str, onnx.TensorProto],
) -> _Block | None:
    """The block whose Attention this is, or None unless it is exactly the exporter's pattern with every
    intermediate used only inside the block."""
    # q, k, v and at most a mask (past key/value would be a decoder's cache); one output.
    if len(attention.input) not in (3, 4) or len(attention.output) != 1:
        return None
    gathers = [producer.get(name) for name in attention.input[:3]]
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
    # each picks one of q, k, v along the first axis and drops it (a rank-0 index), as the exporter writes it
    if any(_int(g, "axis", 0) != 0 or list(initializers[g.input[1]].dims) != [] for g in selects):
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
    if list(bias.dims) != [3 * heads * head_size]:
        return None
    back = consumers.get(attention.output[0], [])
    if len(back) != 1 or back[0].op_type != "Transpose" or _ints(back[0], "perm") != [0, 2, 1, 3]:
        return None
    merge = consumers.get(back[0].output[0], [])
    if len(merge) != 1 or merge[0].op_type != "Reshape":
        return None
    # the fused Attention answers [batch, length, heads * head_size]: the merge must have asked for that
    merged = _constant(merge[0].input[1], initializers)
    if merged is None or len(merged) != 3 or merged[2] != heads * head_size:
        return None
    block = [projection, bias_add, reshape, permute, *selects, back[0], merge[0], attention]
    inner = {output for node in block for output in node.output} - set(merge[0].output)
    outside = [c for name in inner for c in consumers.get(name, []) if all(c is not node for node in block)]
    if outside:
        return None
    return _Block(projection.input[0], weight.name, bias.name, heads, attention, merge[0].output[0], block)


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


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
