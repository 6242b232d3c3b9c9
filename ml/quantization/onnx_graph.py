"""A quantized variant as an ONNX graph run by ONNX Runtime, behind an nn.Module.

`export_onnx` turns a float model into an ONNX graph with a dynamic batch axis (torch.onnx's
maintained exporter, `dynamo=True`). `OnnxModule` holds the graph's bytes as a uint8 buffer (so a
state dict, its size and a deep copy behave as for any module) and runs them with ONNX Runtime on
CPU: `forward` takes the float model's input tensor [N, ...] and returns float outputs.
`check_graph` is what a loader relies on: an ONNX graph is data, and it refuses the two ways a graph
could reach outside itself (operators from custom domains, which need a native library to be
registered, and tensors stored in external files).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto
from torch import nn

from domain.errors import InvalidInputError
from ml.quantization import kernels
from ml.quantization.variants import first_line

# ONNX's own operators and ONNX Runtime's built-in contrib operators (its quantized kernels live there).
# Anything else would need a custom-op library loaded into the session: refused.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})
INPUT, OUTPUT = "input", "output"

log = logging.getLogger(__name__)


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raises the named loggers ("" is the root) to ERROR for the duration of one of our own calls.
    A logger's level is process-wide: quantize from one thread."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(model: nn.Module, example: torch.Tensor, *, opset: int = 23) -> onnx.ModelProto:
    """The float model as an ONNX graph with input `input` [batch, ...] and output `output`.

    Opset 23: scaled_dot_product_attention exports as ONNX's Attention operator, one kernel in ONNX
    Runtime instead of MatMul/Softmax/MatMul (zoo transformer int8 b32 2.75 vs 3.27 ms here).
    """
    try:
        # The exporter logs, on every call, a line per torchvision operator it cannot register
        # (torchvision is not a dependency) and its progress; neither says anything about this model.
        with quiet_loggers("torch.onnx", "torch.onnx._internal.exporter._registration"), torch.inference_mode(False):
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                optimize=True,
                opset_version=opset,
                verbose=False,
            )
    except Exception as e:  # torch.export fails in many ways on code it cannot trace: say which
        raise ExportError(f"{type(model).__name__} cannot be exported to ONNX: {first_line(e)}") from e
    if program is None or program.model_proto is None:
        raise ExportError(f"{type(model).__name__} cannot be exported to ONNX: the exporter returned no graph")
    graph = program.model_proto
    # Each node carries its Python stack trace and module path: a third of a small model's bytes, and
    # this machine's file paths inside an artifact that is shipped elsewhere.
    for node in _nodes(graph.graph):
        del node.metadata_props[:]
        node.doc_string = ""
    return graph


class ExportError(Exception):
    """torch.onnx could not express the model; transforms.py reports the variant unavailable with this text."""


def check_graph(graph: onnx.ModelProto, source: str) -> None:
    """InvalidInputError unless every operator is ONNX's or ONNX Runtime's own and every tensor is inside."""
    domains = {opset.domain for opset in graph.opset_import} | {node.domain for node in _nodes(graph.graph)}
    foreign = sorted(domains - ALLOWED_DOMAINS)
    if foreign or graph.functions:
        named = foreign or sorted({function.domain for function in graph.functions})
        raise InvalidInputError(
            f"{source} uses operators from custom domains {named}; only ONNX and ONNX Runtime's own operators "
            "are loaded (a custom domain needs native code registered); re-export the model without them"
        )
    external = [t.name for t in _initializers(graph.graph) if t.data_location == TensorProto.EXTERNAL]
    if external:
        raise InvalidInputError(
            f"{source} keeps tensors {external[:3]} in external files; only self-contained graphs are loaded "
            "(save the model with its tensors inside)"
        )


def has_subgraphs(body: onnx.GraphProto) -> bool:
    """Whether a node of `body` holds a subgraph (If, Loop, Scan), which may read the outer graph's
    values by name: the rewrites that follow readers by name refuse such graphs."""
    return any(attribute.HasField("g") or attribute.graphs for node in body.node for attribute in node.attribute)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _graphs(sub)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for sub in _graphs(graph):
        yield from sub.node


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for sub in _graphs(graph):
        yield from sub.initializer


def session_for(data: bytes, *, own_kernels: bool = True) -> ort.InferenceSession:
    """A CPU session over the graph's bytes, with torch's thread count (what the float model runs with),
    its norms and GELUs on Retrainer's vectorized kernels where those are built and compute the same
    (ml/quantization/kernels.py; `own_kernels=False`: ONNX Runtime's own, for the bench's peers).

    Every variant, in evaluation, serving and the bench, runs through this one function."""
    fast = kernels.library() if own_kernels else None
    if fast is not None:
        try:
            graph = kernels.with_own_kernels(onnx.load_from_string(data))
            if graph is not None:
                options = _session_options()
                options.register_custom_ops_library(str(fast))
                return _session(graph.SerializeToString(), options)
        except Exception as e:  # a node the kernels do not take (e.g. half floats), a library that will not
            # load: ONNX Runtime's own kernels run the graph as it is
            log.info("Retrainer's kernels do not take this graph: %s", first_line(e))
    return _session(data, _session_options())


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # All of ORT's graph rewrites (constant folding, which turns the fp16 Casts into float weights once;
    # the int8 and LayerNorm/GELU fusions); one graph, run node after node: sequential execution with
    # memory patterns and the arena, so a repeated batch shape reuses its buffers.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_pattern = True
    options.enable_cpu_mem_arena = True
    # Same threads as torch, so a variant is compared with the float model on equal terms; one
    # inter-op thread: these graphs are a chain, and a second pool would only compete for the cores.
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Pool threads spin between the parallel sections of one call (a transformer has dozens; waking
    # sleeping threads cost the MLP b32 0.157 vs 0.110 ms at best) and stop when the call returns: left
    # spinning after it, they took the cores that torch (the float model, training, other variants in
    # this process) needs, and torch ran 3-7x slower between ORT calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are about our exporter
    return options


def _session(data: bytes, options: ort.SessionOptions) -> ort.InferenceSession:
    # ORT's CPU SkipLayerNormalization (what its SkipLayerNormFusion makes of Add + LayerNormalization)
    # measured 540 us against 83 us for the Add and LayerNormalization it replaces ([32, 64, 64]); in
    # the zoo transformer it was a sixth of the int8 graph's time.
    return ort.InferenceSession(
        data, options, providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"]
    )


class OnnxModule(nn.Module):
    """Runs an ONNX graph with ONNX Runtime as if it were the float model it was exported from.

    `onnx_model` (a uint8 buffer) is the graph's bytes, exactly what `save_quantized` writes;
    `variant` and `parameter_count` describe it. The session is rebuilt after a copy or unpickling.
    """

    def __init__(self, data: bytes, *, variant: str, parameter_count: int, own_kernels: bool = True) -> None:
        super().__init__()
        self.variant = variant
        self.parameter_count = parameter_count
        self.own_kernels = own_kernels  # False: ONNX Runtime's own kernels (the bench's reference row)
        self.register_buffer("onnx_model", torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self._start()

    def _start(self) -> None:
        # getattr: a module pickled before `own_kernels` existed runs with them
        self._session = session_for(self.onnx_bytes, own_kernels=getattr(self, "own_kernels", True))
        graph_input = self._session.get_inputs()[0]
        self._input_name = graph_input.name
        self._input_dtype = _numpy_dtype(graph_input.type)

    @property
    def onnx_bytes(self) -> bytes:
        return cast(torch.Tensor, self.onnx_model).numpy().tobytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self._input_dtype)
        (output,) = self._session.run(None, {self._input_name: array})[:1]
        return torch.from_numpy(np.asarray(output, dtype=np.float32))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_session", "_input_name", "_input_dtype"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start()

    def extra_repr(self) -> str:
        return f"variant={self.variant}, bytes={cast(torch.Tensor, self.onnx_model).numel()}"


def _numpy_dtype(onnx_type: str) -> np.dtype[Any]:
    by_name: dict[str, np.dtype[Any]] = {
        "tensor(float)": np.dtype(np.float32),
        "tensor(int64)": np.dtype(np.int64),
        "tensor(int32)": np.dtype(np.int32),
    }
    if onnx_type not in by_name:
        raise InvalidInputError(f"the ONNX graph's input is {onnx_type}; only float32, int64 or int32 inputs are run")
    return by_name[onnx_type]
