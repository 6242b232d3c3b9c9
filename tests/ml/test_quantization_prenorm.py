"""Pre-norm streams' LayerNormalizations as RMSNormalization (ml/quantization/prenorm.py)."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ml.quantization import OnnxModule, Variant, float_weights, quantize, swap_encoder_layers
from ml.quantization.fusion import fuse_attention
from ml.quantization.onnx_graph import INPUT, export_onnx, session_for
from ml.quantization.prenorm import rms_norms
from ml.zoo import build_model

PARAMS = {"vocab_size": 17, "d_model": 32, "nhead": 4, "num_layers": 2, "dim_feedforward": 64, "dropout": 0.0}


def _trained_like(model: nn.Module) -> nn.Module:
    """Every parameter moved off its initial value, as training does: norm biases non-zero, and no
    two layers equal (a fresh encoder's layers are copies of one)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def _transformer() -> nn.Module:
    torch.manual_seed(0)
    return _trained_like(build_model("transformer", PARAMS, [10], 3))


def _tokens(batch: int) -> torch.Tensor:
    return torch.randint(0, 17, (batch, 10), generator=torch.Generator().manual_seed(3)).float()


def _exported(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    exportable = copy.deepcopy(model)
    swap_encoder_layers(exportable)
    graph = export_onnx(exportable, example[:2])
    fuse_attention(graph, separate=True)
    return graph


def _run(graph: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    return np.asarray(session_for(graph.SerializeToString()).run(None, {INPUT: x.numpy()})[0])


def test_the_pre_norm_transformer_norms_become_rms_norms_computing_the_same() -> None:
    model, x = _transformer(), _tokens(6)
    graph = _exported(model, x)
    before = _run(graph, x)

    zeroed = rms_norms(graph)

    ops = Counter(node.op_type for node in graph.graph.node)
    # each layer's two norms; the final norm feeds the mean pooling, where its bias cannot be folded
    assert ops["RMSNormalization"] == 4 and ops["LayerNormalization"] == 1
    assert sorted(zeroed) == [f"encoder.layers.{i}.norm{j}.bias" for i in (0, 1) for j in (1, 2)]
    assert not set(zeroed) & {tensor.name for tensor in graph.graph.initializer}
    np.testing.assert_allclose(_run(graph, x), before, atol=1e-5)


@pytest.mark.parametrize(("variant", "tolerance"), [("dynamic", 0.05), ("static", 0.1), ("fp16", 0.01)])
def test_a_variant_with_rms_norms_gives_float_weights_of_the_same_model(variant: Variant, tolerance: float) -> None:
    model, x = _transformer(), _tokens(16)
    quantized = quantize(model, variant, [x])
    assert isinstance(quantized, OnnxModule)
    graph = onnx.load_model_from_string(quantized.onnx_bytes)
    assert sum(node.op_type == "RMSNormalization" for node in graph.graph.node) == 4
    state = float_weights(quantized.onnx_bytes, source=f"{variant} champion")
    # The centred and folded weights are another parameterisation of the same function: a warm start
    # from them loads key for key and predicts what the model does.
    restarted = build_model("transformer", PARAMS, [10], 3).eval()
    restarted.load_state_dict(state, strict=True)
    assert torch.equal(state["encoder.layers.0.norm1.bias"], torch.zeros(PARAMS["d_model"]))
    with torch.inference_mode():
        assert (restarted(x) - model(x)).abs().max().item() < tolerance
        assert (quantized(x) - model(x)).abs().max().item() < tolerance


class _PostNorm(nn.Module):
    """Post-norm layers: the stream is a norm's output, which attention and the residual read."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(x))  # type: ignore[no-any-return]


class _OpenStream(nn.Module):
    """A pre-norm residual block whose stream is the output itself: read by more than norms."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm, self.linear = nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        return x + self.linear(self.norm(x))  # type: ignore[no-any-return]


class _LinearThenNorm(nn.Module):
    """A Linear then a norm, as in an MLP: no residual stream, so its weights stay as trained."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm, self.head = nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.norm(self.linear(x))))  # type: ignore[no-any-return]


@pytest.mark.parametrize("module", [_PostNorm, _OpenStream, _LinearThenNorm])
def test_a_graph_outside_the_pattern_is_left_as_exported(module: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model, x = _trained_like(module()), torch.randn(4, 5, 16)
    graph = _exported(model, x)
    before = graph.SerializeToString()
    assert rms_norms(graph) == {}
    assert graph.SerializeToString() == before
    with torch.inference_mode():
        np.testing.assert_allclose(_run(graph, x), model(x).numpy(), atol=1e-5)


class _ResidualMLP(nn.Module):
    """A residual stream whose block's Linear reads it directly (no norm in front of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block, self.norm, self.head = (
            nn.Linear(10, 32),
            nn.Linear(32, 32),
            nn.LayerNorm(32),
            nn.Linear(32, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.block(h)
        return self.head(self.norm(h))  # type: ignore[no-any-return]


def test_a_stream_that_a_linear_reads_directly_is_left_as_exported() -> None:
    """Centring the stream would change what such a Linear computes by more than a shift along the
    last axis (m @ W is not constant per row), so the norm after it would not hide it."""
    from ml.quantization.transforms import gemm_as_matmul

    torch.manual_seed(0)
    model, x = _trained_like(_ResidualMLP()), torch.randn(8, 10)
    graph = gemm_as_matmul(export_onnx(model, x[:2]))
    before = _run(graph, x)

    assert rms_norms(graph) == {}

    assert not any(node.op_type == "RMSNormalization" for node in graph.graph.node)
    np.testing.assert_array_equal(_run(graph, x), before)


def test_a_norm_whose_output_is_a_graph_output_keeps_its_bias() -> None:
    """A stream of a table and a position table, its norm read by a projection and also returned as a
    hidden state: the norm's bias cannot be folded into the projection (the hidden state would lose it)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    width = 8

    def tensor(name: str, shape: tuple[int, ...], shift: float = 0.0) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.normal(size=shape) + shift).astype(np.float32), name)

    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x0"]),
        helper.make_node("Add", ["x0", "pos"], ["x1"]),
        helper.make_node("LayerNormalization", ["x1", "g", "b"], ["hidden"], axis=-1),
        helper.make_node("MatMul", ["hidden", "w"], ["o0"]),
        helper.make_node("Add", ["o0", "bo"], ["logits"]),
    ]
    weights = [
        tensor("table", (5, width), 3.0),
        tensor("pos", (3, width)),
        tensor("g", (width,)),
        tensor("b", (width,)),
    ]
    weights += [tensor("w", (width, 4)), tensor("bo", (4,))]
    body = helper.make_graph(
        nodes,
        "stream",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("logits", "hidden")],
        weights,
    )
    graph = helper.make_model(body, opset_imports=[helper.make_opsetid("", 23)])
    graph.ir_version = 10
    ids = rng.integers(0, 5, (2, 3))

    def run() -> list[np.ndarray]:
        return [np.asarray(out) for out in session_for(graph.SerializeToString()).run(None, {"ids": ids})]

    before = run()
    rms_norms(graph)
    for after, expected in zip(run(), before, strict=True):
        np.testing.assert_allclose(after, expected, atol=1e-5)
