"""The exported attention blocks as q, k, v projections + ONNX's Attention on 3-D inputs (ml/quantization/fusion.py)."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from ml.quantization import (
    OnnxModule,
    Variant,
    float_weights,
    load_quantized,
    quantize,
    save_quantized,
    swap_encoder_layers,
)
from ml.quantization.fusion import fuse_attention
from ml.quantization.onnx_graph import INPUT, export_onnx, session_for
from ml.zoo import build_model

MS_DOMAIN = "com.microsoft"
PARAMS = {"vocab_size": 17, "d_model": 32, "nhead": 4, "num_layers": 2, "dim_feedforward": 64, "dropout": 0.0}


def _build() -> nn.Module:
    torch.manual_seed(0)
    return build_model("transformer", PARAMS, [10], 3).eval()


def _tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 17, (batch, 10), generator=torch.Generator().manual_seed(seed)).float()


def _ops(data: bytes) -> Counter[str]:
    return Counter(f"{node.domain}:{node.op_type}" for node in onnx.load_model_from_string(data).graph.node)


def _exported(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    exportable = copy.deepcopy(model)
    swap_encoder_layers(exportable)
    return export_onnx(exportable, example)


@pytest.mark.parametrize("separate", [True, False])
def test_fusion_replaces_each_block_and_computes_the_same(separate: bool) -> None:
    model, x = _build(), _tokens(6, 1)
    graph = _exported(model, x[:2])
    unfused = session_for(graph.SerializeToString()).run(None, {INPUT: x.numpy()})[0]

    packed = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    parts = fuse_attention(graph, separate=separate)
    ops = _ops(graph.SerializeToString())
    assert ops[":Attention"] == 2 and ops[":Transpose"] == 0 and ops[":Reshape"] == 0
    assert ops[":Gather"] == 1  # the embedding's; the q/k/v Gathers are gone
    assert not any(opset.domain == MS_DOMAIN for opset in graph.opset_import)  # ONNX's own operators only
    fused = session_for(graph.SerializeToString()).run(None, {INPUT: x.numpy()})[0]
    np.testing.assert_allclose(fused, unfused, atol=1e-5, rtol=1e-5)
    if not separate:  # the packed projection and a Split in three
        assert ops[":Split"] == 2 and ops[":MatMul"] == 2 * 4 and parts == {}
        return
    assert ops[":Split"] == 0 and ops[":MatMul"] == 2 * 6  # q, k, v, out and the two feed-forward MatMuls
    # each block's packed weight split, and the bias both blocks share (zeros at init) split once
    split = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    assert sorted(packed[name].ndim for name in parts) == [1, 2, 2]
    assert all(len(names) == 3 for names in parts.values())
    for name, names in parts.items():
        assert name not in split
        np.testing.assert_array_equal(np.concatenate([split[n] for n in names], axis=-1), packed[name])


def test_fused_variants_predict_as_the_float_model_and_load_from_their_artifact(tmp_path: Path) -> None:
    model = _build()
    calibration, x = [_tokens(16, seed) for seed in range(3)], _tokens(32, 7)
    with torch.inference_mode():
        reference = model(x)
    cases: tuple[tuple[Variant, float], ...] = (("dynamic", 0.1), ("static", 0.2), ("fp16", 0.01))
    for variant, tolerance in cases:
        quantized = quantize(model, variant, calibration)
        assert isinstance(quantized, OnnxModule)
        ops = _ops(quantized.onnx_bytes)
        assert ops[":Attention"] == 2 and ops[":Transpose"] == 0 and ops[f"{MS_DOMAIN}:QAttention"] == 0, variant
        assert ops[":Split"] == (0 if variant == "dynamic" else 2), variant  # three projections for dynamic
        saved = save_quantized(quantized, variant, tmp_path / f"{variant}.onnx")
        loaded = load_quantized(saved.path, _build, variant, expected_sha256=saved.sha256)
        with torch.inference_mode():
            out = loaded(x)
            assert torch.equal(out, quantized(x)), variant  # what was saved is what runs
        assert (out - reference).abs().max().item() < tolerance, variant
        assert torch.equal(out.argmax(dim=1), reference.argmax(dim=1)), variant
        # the packed q/k/v projection, whole or stored as three parts, comes back whole for a warm start
        state = float_weights(quantized.onnx_bytes, source=f"{variant} champion")
        for key in ("encoder.layers.1.self_attn.in_proj_weight", "encoder.layers.1.self_attn.in_proj_bias"):
            assert torch.allclose(state[key], model.state_dict()[key], atol=0.02), (variant, key)


class _Causal(nn.Module):
    """Causal self-attention through a float mask: the block fuses with its mask carried over."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.encoder(x, mask=mask, is_causal=True)  # type: ignore[no-any-return]


class _SeparateProjections(nn.Module):
    """Attention over three separate q/k/v projections: not the packed pattern, left as exported."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (p(x).view(batch, length, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, 16)


def test_a_masked_block_is_fused_with_its_mask() -> None:
    torch.manual_seed(0)
    model, x = _Causal().eval(), torch.randn(4, 5, 16)
    graph = _exported(model, x[:2])
    assert len(fuse_attention(graph, separate=True)) == 2  # one block: its weight and its bias split
    attention = next(node for node in graph.graph.node if node.op_type == "Attention")
    assert len(attention.input) == 4  # q, k, v and the mask
    with torch.inference_mode():
        expected = model(x).numpy()
    got = session_for(graph.SerializeToString()).run(None, {INPUT: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_block_outside_the_pattern_is_left_as_exported() -> None:
    torch.manual_seed(0)
    model, x = _SeparateProjections().eval(), torch.randn(4, 5, 16)
    graph = _exported(model, x[:2])
    before = graph.SerializeToString()
    assert fuse_attention(graph, separate=True) == {}
    assert graph.SerializeToString() == before
    with torch.inference_mode():
        expected = model(x).numpy()
    np.testing.assert_allclose(session_for(before).run(None, {INPUT: x.numpy()})[0], expected, atol=1e-5)


def test_dynamic_int8_leaves_an_unfused_onnx_attention_in_float() -> None:
    """ORT's quantizer matches op types by name: an ONNX Attention (here one left as exported) must not
    become a QAttention, which ORT refuses to load (the MiniLM story's text model failed so)."""
    torch.manual_seed(0)
    model, x = _SeparateProjections().eval(), torch.randn(4, 5, 16)
    quantized = quantize(model, "dynamic", [x])
    assert isinstance(quantized, OnnxModule)
    ops = _ops(quantized.onnx_bytes)
    assert ops[f"{MS_DOMAIN}:QAttention"] == 0 and ops[":Attention"] == ops_of_export(model, x)[":Attention"] > 0
    with torch.inference_mode():
        assert (quantized(x) - model(x)).abs().max().item() < 0.1


def ops_of_export(model: nn.Module, x: torch.Tensor) -> Counter[str]:
    return _ops(_exported(model, x[:2]).SerializeToString())
