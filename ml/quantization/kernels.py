"""Faster normalization kernels for ONNX Runtime on CPU: Retrainer's own custom operators.

ONNX Runtime's CPU kernels for LayerNormalization and RMSNormalization sum each row in one chain of
dependent scalar additions, which cannot vectorize: ~70 us for [32, 64, 64] here on two cores, against
~10 us for the same work vectorized (`native/ortops.c`). In the zoo transformer's int8 graph that was a
fifth of the time. `native/ortops.c` implements both operators, with ONNX's inputs, attributes and
output, in the domain `ai.retrainer.cpu`; `make` builds it into `native/libretrainer_ortops.so`
(`native/build.sh`).

`with_fast_norms` is a session-time rewrite, like ONNX Runtime's own fusions: artifacts stay standard
ONNX (`check_graph` still refuses custom domains in what is loaded), and a graph runs the same with or
without the library. A norm moves to the custom domain only where the kernel computes exactly what ONNX
specifies: float input (checked when the session is made: ONNX Runtime refuses a type the kernel does not
declare, and `onnx_graph.session_for` then runs the graph unchanged), normalization over the last axis
only, one output (no Mean / InvStdDev), and a scale and bias that are constants of one value or one per
element of that axis. The sums are float, as in ONNX Runtime's kernels; results agree to float rounding
(~1e-6 relative), not bit for bit: the vector lanes add in another order.

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


def with_fast_norms(graph: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of `graph` whose eligible norms (see the module's docstring) run Retrainer's kernels, or
    None when none is eligible."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(graph)
    body = rewritten.graph
    constants = _constant_sizes(body)
    moved = 0
    for node in body.node:
        if node.op_type in _NORMS and node.domain in _ONNX_DOMAINS and _eligible(node, constants):
            node.domain = DOMAIN
            moved += 1
    if not moved:
        return None
    rewritten.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return rewritten


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
