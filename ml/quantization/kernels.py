"""Faster normalization and GELU kernels for ONNX Runtime on CPU: Retrainer's own custom operators.

ONNX Runtime's CPU kernels for LayerNormalization and RMSNormalization sum each row in one chain of
dependent scalar additions, which cannot vectorize: ~70 us for [32, 64, 64] here on two cores, against
~10 us for the same work vectorized (`native/ortops.c`). In the zoo transformer's int8 graph that was a
fifth of the time; ORT's Gelu calls erf per element, another tenth. `native/ortops.c` implements the
three, with ONNX's inputs, attributes and output, in the domain `ai.retrainer.cpu`, and Skip variants
of the norms that also take the residual Add the norm reads (inputs x, skip, scale[, bias]; outputs the
norm and the sum, which keeps the Add's name for its other readers): one pass over the rows instead of
two kernels. `make` builds the library into `native/libretrainer_ortops.so` (`native/build.sh`).

`with_own_kernels` is a session-time rewrite, like ONNX Runtime's own fusions: artifacts stay standard
ONNX (`check_graph` still refuses custom domains in what is loaded), and a graph runs the same with or
without the library. A norm moves to the custom domain only where the kernel computes exactly what ONNX
specifies: float input (checked when the session is made: ONNX Runtime refuses a type the kernel does not
declare, and `onnx_graph.session_for` then runs the graph unchanged), normalization over the last axis
only, one output (no Mean / InvStdDev), and a scale and bias that are constants of one value or one per
element of that axis. Its Add is taken too when ONNX's shape inference knows both addends' shapes: the
sum's, and the sum's or its trailing dimensions (a position table added to every sequence), never a
1-D addend (a bias, which ONNX Runtime adds inside the MatMul before); shape inference trusts ONNX's rule
that one symbolic dimension name is one size, and the kernel takes the larger addend as x when a feed
breaks it. Operators the graph's opset lacks, and inputs whose rank inference does not know or is above
16, are left to ONNX Runtime; so is everything when the library will not load.

Results: the norms agree with ONNX Runtime's to ~1e-6 (the vector lanes add in another order);
LayerNormalization shifts each row by its first value before summing, so a row far from zero (a mean of
1000, a spread of 0.01) keeps its precision (ORT's error there: 3e-3, ours 1e-7). GELU's erf is Abramowitz
& Stegun 7.1.28, within 1e-6 of the exact function (ORT's: 4.5e-7), which below x = -3, where GELU is near
0, is a larger relative error than ORT's.

`RETRAINER_ORT_OPS_LIBRARY` names the library (the image sets it); empty turns the kernels off. By
default the library beside this package is used when it was built.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import onnx
from onnx import helper

DOMAIN = "ai.retrainer.cpu"
SETTING = "RETRAINER_ORT_OPS_LIBRARY"
DEFAULT_LIBRARY = Path(__file__).parent / "native" / "libretrainer_ortops.so"
_NORMS = ("LayerNormalization", "RMSNormalization")
# the opset each operator first appears in: a graph of an older opset is left to ONNX Runtime, which
# refuses it there (with the kernels it would run, and then fail where they are not built)
_SINCE = {"LayerNormalization": 17, "RMSNormalization": 23, "Gelu": 20}
_NEVER = 1 << 30
MAX_RANK = 16  # native/ortops.c's
_ONNX_DOMAINS = ("", "ai.onnx")

log = logging.getLogger(__name__)


@cache
def library() -> Path | None:
    """The custom-operator library to load (an absolute path: flows run in other working directories),
    or None: none configured or built (ONNX Runtime's kernels run). A configured path that does not exist
    is logged once and ignored: serving goes on."""
    configured = os.environ.get(SETTING)
    if configured is None:
        return DEFAULT_LIBRARY if DEFAULT_LIBRARY.is_file() else None
    if not configured:
        return None
    path = Path(configured).resolve()
    if not path.is_file():
        log.warning("%s=%s: no such file; ONNX Runtime's own normalization kernels are used", SETTING, configured)
        return None
    return path


def with_own_kernels(graph: onnx.ModelProto, *, residual: bool = True) -> onnx.ModelProto | None:
    """A copy of `graph` whose eligible norms (see the module's docstring) run Retrainer's kernels, each
    with the residual Add it reads where that adds two tensors of one shape (`residual`), and its erf
    GELUs too; None when nothing is eligible (decided before any copy or shape inference)."""
    opset = next((o.version for o in graph.opset_import if o.domain in _ONNX_DOMAINS), 0)
    constants = _constant_sizes(graph.graph)
    chosen = [
        index
        for index, node in enumerate(graph.graph.node)
        if node.domain in _ONNX_DOMAINS
        and opset >= _SINCE.get(node.op_type, _NEVER)  # an operator of the graph's opset: ONNX Runtime's too
        and ((node.op_type == "Gelu" and _exact(node)) or (node.op_type in _NORMS and _eligible(node, constants)))
    ]
    if not chosen:
        return None
    shapes, ranks = _shapes(graph)
    # the kernels take inputs of rank 1 to MAX_RANK, known before running (unknown: ONNX Runtime's kernels)
    chosen = [i for i in chosen if 1 <= ranks.get(graph.graph.node[i].input[0], 0) <= MAX_RANK]
    if not chosen:
        return None
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(graph)
    body = rewritten.graph
    moved = [body.node[i] for i in chosen]
    for node in moved:
        node.domain = DOMAIN
    norms = [node for node in moved if node.op_type in _NORMS]
    # onnx_graph runs sessions through this module, so its helper is imported here, when both are loaded
    from ml.quantization.onnx_graph import has_subgraphs

    if residual and not has_subgraphs(body):  # a subgraph may read any value by name: no node goes then
        try:
            _take_residual_adds(body, norms, shapes)
        except _Unordered:  # a graph whose nodes cannot be ordered (not ONNX's rule): the norms alone
            return with_own_kernels(graph, residual=False)
    rewritten.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return rewritten


def _take_residual_adds(body: onnx.GraphProto, norms: list[onnx.NodeProto], shapes: dict[str, Shape]) -> None:
    """Each norm that reads an Add of two tensors of known shapes, one that of the sum and the other
    that or its trailing dimensions, becomes Skip<norm>(a, b, scale[, bias]) -> (norm, a + b): the sum
    keeps the Add's name for its other readers, and the Add goes."""
    producer = {output: node for node in body.node for output in node.output}
    taken: list[onnx.NodeProto] = []
    for norm in norms:
        add = producer.get(norm.input[0])
        if add is None or add.op_type != "Add" or add.domain not in _ONNX_DOMAINS or any(add is t for t in taken):
            continue
        # the kernel takes x (input 0) of the sum's shape and a skip of that shape or of its trailing
        # dimensions after leading 1s (a position table added to every sequence); a + b == b + a in floats
        addends = next((pair for pair in (list(add.input), list(add.input)[::-1]) if _skips(shapes, *pair)), None)
        if addends is None:
            continue
        sum_name = add.output[0]
        inputs = [*addends, *norm.input[1:]]
        del norm.input[:]
        norm.input.extend(inputs)
        norm.output.append(sum_name)
        norm.op_type = f"Skip{norm.op_type}"
        taken.append(add)
    if not taken:
        return
    kept = [node for node in body.node if not any(node is add for add in taken)]
    del body.node[:]
    body.node.extend(_in_order(body, kept))


Shape = tuple[int | str, ...]


def _skips(shapes: dict[str, Shape], x: str, skip: str) -> bool:
    """Whether the kernel can add `skip` to `x`: both shapes known, `skip`'s (after leading 1s) x's or
    its trailing dimensions, and not a bias (1-D, which ONNX Runtime adds inside the MatMul before)."""
    full, part = shapes.get(x), shapes.get(skip)
    if full is None or part is None:
        return False
    while len(part) > 1 and part[0] == 1:
        part = part[1:]
    if len(part) > len(full) or full[len(full) - len(part) :] != part:
        return False
    return not len(part) == 1 < len(full)


def _shapes(graph: onnx.ModelProto) -> tuple[dict[str, Shape], dict[str, int]]:
    """From ONNX's shape inference, by name: every value's shape that it fully knows (each dimension a
    number or a named symbol, such as the batch; ONNX's rule: one name, one size) and every
    initializer's; and every value's rank it knows. Both {} when inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(graph)
    except Exception:  # inference is an optimisation's input here, never a reason to fail the session
        return {}, {}
    body = inferred.graph
    shapes: dict[str, Shape] = {tensor.name: tuple(tensor.dims) for tensor in body.initializer if all(tensor.dims)}
    ranks = {tensor.name: len(tensor.dims) for tensor in body.initializer}
    for value in [*body.input, *body.value_info, *body.output]:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = tuple(dim.dim_value if dim.HasField("dim_value") else dim.dim_param for dim in tensor.shape.dim)
        ranks[value.name] = len(dims)
        if all(dim not in (0, "") for dim in dims):
            shapes[value.name] = dims
    return shapes, ranks


def _in_order(body: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` in an order where each comes after the producers of its inputs (ONNX's rule), keeping
    the given order wherever it already holds."""
    known = {value.name for value in body.input} | {tensor.name for tensor in body.initializer} | {""}
    ordered: list[onnx.NodeProto] = []
    waiting = list(nodes)
    while waiting:
        ready = next((i for i, node in enumerate(waiting) if all(name in known for name in node.input)), None)
        if ready is None:
            raise _Unordered
        node = waiting.pop(ready)
        ordered.append(node)
        known.update(node.output)
    return ordered


class _Unordered(Exception):
    """Some node reads a value that no node before it, input or initializer gives."""


def _exact(gelu: onnx.NodeProto) -> bool:
    """ONNX's Gelu with erf (approximate "none", the default): the kernel's; "tanh" is left to ONNX Runtime."""
    approximate = next((a for a in gelu.attribute if a.name == "approximate"), None)
    return approximate is None or helper.get_attribute_value(approximate) in (b"none", "none")


def _eligible(node: onnx.NodeProto, constants: dict[str, int]) -> bool:
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    if attributes.get("axis", -1) != -1 or attributes.get("stash_type", 1) != 1:
        return False
    if len([name for name in node.output if name]) != 1 or node.output[0] == "":
        return False
    # scale, and the bias if any: constants, whose size the kernel checks against the last axis (one
    # value, or one per element) and refuses otherwise; a computed scale is left to ONNX Runtime
    parameters = [name for name in node.input[1:] if name]
    if node.op_type == "RMSNormalization" and len(node.input) > 2:
        return False
    return len(parameters) >= 1 and all(constants.get(name, 0) >= 1 for name in parameters)


def _constant_sizes(body: onnx.GraphProto) -> dict[str, int]:
    """Element count of each 1-D constant: initializers, and a Cast of one (compact.py stores the norms'
    vectors half behind a Cast that ONNX Runtime folds at load)."""
    sizes = {tensor.name: int(tensor.dims[0]) for tensor in body.initializer if len(tensor.dims) == 1}
    for node in body.node:
        if node.op_type == "Cast" and node.domain in _ONNX_DOMAINS and node.input[0] in sizes:
            sizes[node.output[0]] = sizes[node.input[0]]
    return sizes
