"""What the int8 variants leave float, stored small (ml/quantization/compact.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from ml.quantization import OnnxModule, float_weights, quantize, serialized_size
from ml.quantization.compact import compact
from ml.quantization.onnx_graph import session_for
from ml.zoo import build_model


def _table_graph() -> onnx.ModelProto:
    """ids -> Gather(embedding) + position table -> MatMul(weight): the shapes of a token model."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((17, 16)).astype(np.float32), "embed"),
        numpy_helper.from_array((rng.standard_normal((1, 32, 16)) * 0.1).astype(np.float32), "position"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["rows"]),
        helper.make_node("Add", ["rows", "position"], ["placed"]),
        helper.make_node("Add", ["placed", "bias"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tables",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 32, 16])],
        initializers,
        value_info=[helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 32, 16])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _nodes_reading_int8_after_load(graph: onnx.ModelProto, folder: Path) -> list[str]:
    """The op types of the nodes that read an int8 initializer in the graph ORT runs (session_for's level)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load_model(folder / "optimized.onnx")
    int8 = {t.name for t in optimized.graph.initializer if t.data_type == TensorProto.INT8}
    return [node.op_type for node in optimized.graph.node if int8 & set(node.input)]


def test_tables_become_int8_vectors_half_and_the_graph_computes_nearly_the_same(tmp_path: Path) -> None:
    graph, ids = _table_graph(), np.random.default_rng(1).integers(0, 17, (4, 32))
    expected = session_for(graph.SerializeToString()).run(None, {"ids": ids})[0]

    renamed = compact(graph, tables_int8=True)

    stored = {t.name: t.data_type for t in graph.graph.initializer}
    embed, position, bias = (renamed[name] for name in ("embed", "position", "bias"))
    assert stored[f"{embed}_quantized"] == stored[f"{position}_quantized"] == TensorProto.INT8
    # A vector stays half: few bytes, and a norm's scale is sensitive.
    assert stored[f"{bias}.fp16"] == TensorProto.FLOAT16
    assert not any(node.op_type == "DequantizeLinear" for node in graph.graph.node)
    # The tables are widened by constant-only Casts and Muls, which ORT folds when the session loads:
    # none of them runs per call.
    assert _nodes_reading_int8_after_load(graph, tmp_path) == []
    assert not graph.graph.value_info and all(not node.name for node in graph.graph.node)
    assert [v.name for v in graph.graph.input] == ["ids"] and [v.name for v in graph.graph.output] == ["output"]
    got = session_for(graph.SerializeToString()).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, expected, atol=0.03)  # int8 step of a table whose largest value is ~3.5


def test_the_zoo_transformer_int8_is_three_and_a_half_times_smaller_and_keeps_its_weights() -> None:
    torch.manual_seed(0)
    model = build_model("transformer", {"vocab_size": 17, "dropout": 0.0}, [64], 10).eval()
    x = torch.randint(0, 17, (8, 64)).float()
    quantized = quantize(model, "dynamic", [x])
    assert isinstance(quantized, OnnxModule)
    assert serialized_size(model, "none") / serialized_size(quantized, "dynamic") >= 3.5
    # symmetric int8 weights: their all-zero zero points are dropped (an optional input)
    kernels = [n for n in onnx.load_model_from_string(quantized.onnx_bytes).graph.node if n.op_type == "MatMulInteger"]
    assert kernels and all(len(node.input) == 3 for node in kernels)
    with torch.inference_mode():
        assert (quantized(x) - model(x)).abs().max().item() < 0.1
    state = float_weights(quantized.onnx_bytes, source="champion v1")
    for key in ("embed.weight", "position"):  # stored as int8 tables, recovered under the float keys
        assert torch.allclose(state[key], model.state_dict()[key], atol=0.02), key


class _ScaledLogits(torch.nn.Module):
    """A float parameter whose own name ends like a stored form's suffix (`_scale`), as CLIP's has."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)
        self.logit_scale = torch.nn.Parameter(torch.tensor([2.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.logit_scale


def test_a_float_weight_named_like_a_suffix_is_recovered_by_its_whole_name() -> None:
    torch.manual_seed(0)
    model = _ScaledLogits().eval()
    quantized = quantize(model, "dynamic", [torch.randn(8, 64)])
    assert isinstance(quantized, OnnxModule)
    state = float_weights(quantized.onnx_bytes, source="champion v1")
    assert torch.equal(state["logit_scale"], model.logit_scale.detach())
    assert torch.allclose(state["linear.weight"], model.linear.weight.detach(), atol=0.02)
