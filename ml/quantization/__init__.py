"""Quantized variants of a trained float model for CPU inference, and the choice between them.

Variants (`quantization.type` in a spec): `none` (the float model), `dynamic` (int8 weights, int8
activations quantized per call, for nn.Linear), `static` (int8 weights and activations, calibrated),
`fp16` (weights stored half, computed in float). `quantize_and_select` builds the float model and the
variant(s) asked for, scores each with the caller's evaluator and keeps the fastest whose accuracy
drop is within the limit; `save_quantized` / `load_quantized` persist any variant as tensors only.

Backend: torch.ao.quantization (eager mode, fbgemm/x86 kernels), not torchao. Measured on this
machine (2-core AMD EPYC, AVX-512 VNNI, torch 2.15, torchao 0.18; `bench/quantization.py`, p50 ms,
round-robin; digits MLP with hidden [1024, 1024], zoo transformer d_model 64):

- torch.ao dynamic int8: MLP b32 0.32 vs 0.83 float (2.6x), b1 0.17 vs 0.18; transformer b32
  1.02x. It pays with width: b32 speed-up 0.65x / 0.98x / 2.7x / 4.8x for MLP widths 128-64 /
  512-256 / 1024-1024 / 2048-2048, and 1.1x / 1.6x / 2.2x for transformer d_model 64 / 128 / 256
  (at d_model 64 the quantize-activations step costs what the int8 GEMM saves).
- torchao eager (no compile) is slower than float everywhere: Int8DynamicActivationInt8Weight MLP
  b32 1.23 ms (0.68x), b1 0.90 ms (5x slower); Int8WeightOnly b32 1.05 ms (0.79x); transformer b32
  0.67x / 0.85x. With torch.compile (one-off run): 5-30 s compile per model and shape; MLP b32 still
  0.40x float (0.49x with inductor freezing, a process-wide setting, which does reach 3.3x at b1), and
  compiling the quantized transformer with freezing crashed inside inductor. Not a serving path yet.
- torch.ao warns on every call that it is deprecated (it announces removal "in 2.10"; it is still
  here in 2.15). The warnings are caught locally (`variants.torch_ao_quiet`), never process-wide. If it does
  go, this package is the one place to change.
- fp16 computed in half (`model.half()`) is slow here: no fp16 arithmetic on this CPU, every op
  converts: MLP b32 0.40x, transformer 0.12x. So `fp16` keeps activations float and uses fbgemm's
  fp16-weight GEMM for nn.Linear (MLP 1.4x, CNN 1.07x, transformer 0.8-0.97x) with every other float
  tensor rounded to half; its artifact is 1.7-2x smaller.
- `static`: MLP 2.35x, zoo CNN 1.7x (conv+bn+relu fused, residual add through FloatFunctional),
  3.8x / 2.4x smaller. Unavailable for the transformer (token ids feed an Embedding; no quantized
  attention kernels); for other models it is attempted and, if an op has no quantized kernel,
  reported unavailable with that op, never faked.
- The transformer's int8 layers cannot use torch's fused encoder kernel, so `dynamic` and `fp16`
  swap each nn.TransformerEncoderLayer for the same maths on scaled_dot_product_attention with its
  projections as nn.Linear (nn.MultiheadAttention hides three quarters of its weights from dynamic
  quantization). In float that path alone measured 0.98-1.15x of the fused kernel: no gain hidden
  in the int8 numbers.

Where things live: `variants.py` (the variant names, their error, torch.ao's warnings),
`attention.py` (the transformer's encoder layers made quantizable), `transforms.py` (`quantize`:
how each variant is built), `selection.py` (scores, the selection rule, `quantize_and_select`),
`persistence.py` (`save_quantized` / `load_quantized`). Import from this package; the names below
are its public interface.
"""

from ml.quantization.attention import swap_encoder_layers
from ml.quantization.persistence import FORMAT, SavedVariant, load_quantized, save_quantized, serialized_size
from ml.quantization.selection import (
    QuantizationOutcome,
    QuantizationReport,
    VariantResult,
    VariantScore,
    quantize_and_select,
    select_variant,
)
from ml.quantization.transforms import quantize, quantize_each
from ml.quantization.variants import VARIANTS, QuantizationUnavailableError, Variant, variants_for

__all__ = [
    "FORMAT",
    "VARIANTS",
    "QuantizationOutcome",
    "QuantizationReport",
    "QuantizationUnavailableError",
    "SavedVariant",
    "Variant",
    "VariantResult",
    "VariantScore",
    "load_quantized",
    "quantize",
    "quantize_and_select",
    "quantize_each",
    "save_quantized",
    "select_variant",
    "serialized_size",
    "swap_encoder_layers",
    "variants_for",
]
