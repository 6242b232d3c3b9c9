"""Each exported self-attention block as a projection, a Split and ONNX's Attention on 3-D inputs.

torch.onnx writes each `_ProjectedSelfAttention` (ml/quantization/attention.py) as a projection
MatMul + bias Add, a Reshape to [batch, length, 3, heads, head_size], a 5-D Transpose, three Gathers,
ONNX's Attention over [batch, heads, length, head_size], and a Transpose + Reshape back. On 2 CPU
cores those copies took half of the zoo transformer's time in ONNX Runtime. ONNX's Attention also
takes q, k and v as [batch, length, heads * head_size] (its `q_num_heads` / `kv_num_heads`
attributes) and returns that layout, so the block becomes MatMul + Add (which dynamic int8 turns
into one DynamicQuantizeMatMul), a Split in three and one Attention: no copies, and only ONNX's own
operators. Measured against ONNX Runtime's contrib Attention (which quantize_dynamic makes a
QAttention; the previous form of this fusion) on the zoo transformer's block at batch 32: 0.52 vs
1.20 ms on one thread, 0.48 vs 0.61 ms on two; ORT's transformer optimizer does not recognise the
dynamo exporter's pattern at all. A mask and the causal flag carry over unchanged. A block that does
not match exactly (separate q/k/v projections, a key/value cache, another layout) is left as
exported: fusion is an optimisation, never a requirement.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper, numpy_helper

_Q_K_V = (0, 1, 2)


def fuse_attention(graph: onnx.ModelProto) -> int:
    """Rewrites, in place, each exported self-attention block into Split + ONNX Attention over the
    projection's output. Returns how many blocks it rewrote."""
    body = graph.graph
    initializers = {tensor.name: tensor for tensor in body.initializer}
    producer = {output: node for node in body.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in body.node:
        for name in node.input:
            consumers[name].append(node)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(the exported Attention node) -> what replaces it
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
    nodes: list[onnx.NodeProto] = []
    for node in body.node:
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
        elif id(node) not in removed:
            nodes.append(node)
    replace_nodes(body, nodes)
    # The rewritten outputs have other shapes than the exporter recorded (3-D instead of 5-D / 4-D).
    del body.value_info[:]
    return len(replaced)


def replace_nodes(body: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """The graph's nodes replaced by `nodes` (in that order), and the initializers none of them reads dropped."""
    del body.node[:]
    body.node.extend(nodes)
    used = {name for node in body.node for name in node.input}
    kept = [tensor for tensor in body.initializer if tensor.name in used]
    del body.initializer[:]
    body.initializer.extend(kept)


def _match_block(
    attention: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    consumers: dict[str, list[onnx.NodeProto]],
    initializers: dict[str, onnx.TensorProto],
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]] | None:
    """The Split + Attention that replace the block, and the nodes they make unused, or None unless the
    block is exactly the exporter's pattern with every intermediate used only inside the block."""
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
    block = [reshape, permute, *selects, attention, back[0], merge[0]]
    inner = {output for node in block for output in node.output} - set(merge[0].output)
    outside = [c for name in inner for c in consumers.get(name, []) if all(c is not node for node in block)]
    if outside or len(consumers.get(reshape.input[0], [])) != 1:
        return None
    name = attention.name or merge[0].output[0]
    q, k, v = (f"{name}.{part}" for part in "qkv")
    split = helper.make_node("Split", [bias_add.output[0]], [q, k, v], name=f"{name}.split", axis=-1, num_outputs=3)
    # The mask, is_causal, scale and softcap mean the same on 3-D inputs: carried over as they are.
    fused = helper.make_node(
        "Attention",
        [q, k, v, *attention.input[3:]],
        list(merge[0].output),
        name=f"{name}.3d",
        q_num_heads=heads,
        kv_num_heads=heads,
    )
    fused.attribute.extend(a for a in attention.attribute if a.name not in ("q_num_heads", "kv_num_heads"))
    return [split, fused], block


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
