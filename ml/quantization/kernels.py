"""Faster normalization kernels for ONNX Runtime on CPU: Retrainer's own custom operators.

ONNX Runtime's CPU kernels for LayerNormalization and RMSNormalization sum each row in one chain of
dependent scalar additions, which cannot vectorize: ~70 us for [32, 64, 64] here on two cores, against
~10 us for the same work vectorized (`native/ortops.c`). In the zoo transformer's int8 graph that was a
fifth of the time. `native/ortops.c` implements both operators, with ONNX's inputs, attributes and
output, in the domain `ai.retrainer.cpu`, and Skip variants that also take the residual Add the norm
reads (inputs x, skip, scale[, bias]; outputs the norm and the sum, which keeps the Add's name for its
other readers): one pass over the rows instead of two kernels. `make` builds the library into
`native/libretrainer_ortops.so` (`native/build.sh`).

`with_own_kernels` is a session-time rewrite, like ONNX Runtime's own fusions: artifacts stay standard
ONNX (`check_graph` still refuses custom domains in what is loaded), and a graph runs the same with or
without the library. A norm moves to the custom domain only where the kernel computes exactly what ONNX
specifies: float input (checked when the session is made: ONNX Runtime refuses a type the kernel does not
declare, and `onnx_graph.session_for` then runs the graph unchanged), normalization over the last axis
only, one output (no Mean / InvStdDev), and a scale and bias that are constants of one value or one per
element of that axis. Its Add is taken too when ONNX's shape inference knows both addends' shapes: the
sum's, and the sum's or its trailing dimensions (a position table added to every sequence). The sums are
float, as in ONNX Runtime's kernels; results agree to float rounding (~1e-6 relative), not bit for bit:
the vector lanes add in another order.

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
_ONNX_DOMAINS = ("", "ai.onnx")

log = logging.getLogger(__name__)


@cache
def library() -> Path | None:
    """The custom-operator library to load, or None: none configured or built (ONNX Runtime's kernels
    run). A configured path that does not exist is logged once and ignored: serving goes on."""
    configured = os.environ.get(SETTING)
    if configured is None:
        return DEFAULT_LIBRARY if DEFAULT_LIBRARY.is_file() else None
    if not configured:
        return None
    path = Path(configured)
    if not path.is_file():
        log.warning("%s=%s: no such file; ONNX Runtime's own normalization kernels are used", SETTING, configured)
        return None
    return path


def with_own_kernels(graph: onnx.ModelProto, *, residual: bool = True) -> onnx.ModelProto | None:
    """A copy of `graph` whose eligible norms (see the module's docstring) run Retrainer's kernels, each
    with the residual Add it reads where that adds two tensors of one shape (`residual`), and its exact
    GELUs too; None when nothing is eligible."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(graph)
    body = rewritten.graph
    constants = _constant_sizes(body)
    norms = [
        node
        for node in body.node
        if node.op_type in _NORMS and node.domain in _ONNX_DOMAINS and _eligible(node, constants)
    ]
    gelus = [node for node in body.node if node.op_type == "Gelu" and node.domain in _ONNX_DOMAINS and _exact(node)]
    if not norms and not gelus:
        return None
    for node in [*norms, *gelus]:
        node.domain = DOMAIN
    if residual and not _has_subgraphs(body):  # a subgraph may read any value by name: no node goes then
        try:
            _take_residual_adds(body, norms, _shapes(graph))
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
        first, second = (shapes.get(name) for name in add.input)
        if first is None or second is None:
            continue
        # the kernel takes x (input 0) of the sum's shape and a skip of that shape or of its trailing
        # dimensions after leading 1s (a position table added to every sequence); a + b == b + a in floats
        if len(second) > len(first):
            first, second = second, first
            addends = [add.input[1], add.input[0]]
        else:
            addends = list(add.input)
        while len(second) > 1 and second[0] == 1:
            second = second[1:]
        if not second or len(second) > len(first) or first[len(first) - len(second) :] != second:
            continue
        if len(second) == 1 < len(first):  # a bias: ONNX Runtime adds it inside the MatMul before it
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


def _shapes(graph: onnx.ModelProto) -> dict[str, Shape]:
    """Every value's shape that ONNX's shape inference fully knows (each dimension a number or a named
    symbol, such as the batch), and every initializer's, by name; {} when inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(graph)
    except Exception:  # inference is an optimisation's input here, never a reason to fail the session
        return {}
    body = inferred.graph
    shapes: dict[str, Shape] = {tensor.name: tuple(tensor.dims) for tensor in body.initializer if all(tensor.dims)}
    for value in [*body.input, *body.value_info, *body.output]:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = tuple(dim.dim_value if dim.HasField("dim_value") else dim.dim_param for dim in tensor.shape.dim)
        if all(dim not in (0, "") for dim in dims):
            shapes[value.name] = dims
    return shapes


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


def _has_subgraphs(body: onnx.GraphProto) -> bool:
    return any(attribute.HasField("g") or attribute.graphs for node in body.node for attribute in node.attribute)


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
