"""The transformer's encoder layers in a form int8 can reach.

torch's nn.TransformerEncoderLayer runs, in eval mode, a fused kernel that reads its weights as
float tensors, and nn.MultiheadAttention keeps its input projection as a bare parameter.
`swap_encoder_layers` replaces each such layer, in place, by the same maths on
scaled_dot_product_attention with every projection an nn.Linear, which exports as a MatMul over a
weight (what ONNX Runtime's int8 reaches) and an ONNX Attention operator; every ONNX variant calls
it on a copy before exporting (ml/quantization/transforms.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class _ProjectedSelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention with both projections as nn.Linear modules.

    nn.MultiheadAttention keeps its input projection as a bare parameter and its output projection as
    a Linear subclass that dynamic quantization deliberately skips, so three quarters of the attention
    weights would stay float. Same weights, same maths (masks included), in a form int8 can reach.
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        # TransformerEncoder reads `batch_first` from its first layer's self_attn.
        self.batch_first = attention.batch_first
        self.num_heads = attention.num_heads
        width = attention.embed_dim
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        with torch.no_grad():
            self.in_proj.weight.copy_(attention.in_proj_weight)
            self.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.in_proj_bias is not None:
                cast(torch.Tensor, self.in_proj.bias).copy_(attention.in_proj_bias)
            if attention.out_proj.bias is not None:
                cast(torch.Tensor, self.out_proj.bias).copy_(attention.out_proj.bias)

    # Only _QuantizableEncoderLayer calls this, and always with every argument.
    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, length, width = x.shape
        heads = self.num_heads
        qkv = self.in_proj(x).view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, heads, length, x.dtype)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=mask, is_causal=is_causal and mask is None
        )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return cast(torch.Tensor, out if self.batch_first else out.transpose(0, 1))


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    length: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    # nn.MultiheadAttention's boolean masks mean "True = do not attend", SDPA's the opposite; an additive
    # float mask means the same to both.
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    combined: torch.Tensor | None = None
    if attn_mask is not None:
        combined = additive(attn_mask)
        if combined.dim() == 3:  # (batch * heads, L, L)
            combined = combined.view(batch, heads, length, length)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, length)
        combined = padding if combined is None else combined + padding
    return combined


class _QuantizableEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer's forward without its fused fast path, over `_ProjectedSelfAttention`.

    The fused kernel (`torch._transformer_encoder_layer_fwd`) reads the Linear weights as float tensors
    and fails on quantized modules, so a quantized layer must take the plain path.
    """

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.self_attn = _ProjectedSelfAttention(layer.self_attn)
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout, self.dropout1, self.dropout2 = layer.dropout, layer.dropout1, layer.dropout2
        self.norm_first = layer.norm_first
        self.activation: Callable[[torch.Tensor], torch.Tensor] = layer.activation

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._attend(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attend(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._feed_forward(x))  # type: ignore[no-any-return]

    def _attend(
        self, x: torch.Tensor, mask: torch.Tensor | None, padding: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, mask, padding, is_causal))  # type: ignore[no-any-return]

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))  # type: ignore[no-any-return]


def _attention_unsupported(attention: nn.MultiheadAttention) -> str | None:
    if not attention._qkv_same_embed_dim:
        return "separate q/k/v projection weights"
    if attention.bias_k is not None or attention.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    return None


def swap_encoder_layers(model: nn.Module) -> None:
    """Replaces, in place, every plain nn.TransformerEncoderLayer whose attention it can express by the
    same maths with nn.Linear projections; other modules are left as they are."""
    for module in list(model.modules()):
        if isinstance(module, nn.TransformerEncoder):
            # The nested-tensor path reads fused-kernel weights from the layers; it is a fast-path feature only.
            module.use_nested_tensor = False
        for name, child in list(module.named_children()):
            # Exact type: a subclass may override forward, and then our layer would not compute the same thing.
            if type(child) is nn.TransformerEncoderLayer and _attention_unsupported(child.self_attn) is None:
                setattr(module, name, _QuantizableEncoderLayer(child))
