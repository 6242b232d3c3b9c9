"""Quantized variants of a trained float model for CPU inference, and the choice between them.

Variants (`quantization.type` in a spec): `none` (the float torch model), `dynamic` (int8 weights,
activations quantized per call), `static` (int8 weights and activations, calibrated), `fp16`
(weights stored half, computed in float). `quantize_and_select` builds the float model and the
variant(s) asked for, scores each with the caller's evaluator and keeps the fastest whose drop in
the budget's metric (`MetricBudget`, or `max_accuracy_drop`) is within it; `save_quantized` /
`load_quantized` persist any variant as data only (a state dict, or an ONNX graph).

Backend: ONNX Runtime. Each variant is the float model exported with torch.onnx's dynamo exporter
(opset 23, dynamic batch axis), transformed by `onnxruntime.quantization` (`quantize_dynamic`,
`quantize_static` in QDQ format) and run by an InferenceSession on CPU behind an nn.Module
(`OnnxModule`), so evaluation and serving call it like the float model. torch.ao.quantization (the
previous backend) is deprecated and printed a warning on every call; it is no longer imported.
Measured on this machine (2-core AMD EPYC, AVX-512 VNNI, torch 2.15, onnxruntime 1.31, shared with
other jobs; `bench/quantization.py`, p50 ms, round-robin; digits MLP [1024, 1024], zoo transformer
d_model 64, a Linear-heavy transformer d_model 512 x 2 layers), quiet-moment figures:

- MLP b32: torch fp32 0.54-0.70, dynamic int8 0.130-0.138 (4.13x, 4.20x, 5.08x in three full runs
  of the final code; 3.98-4.72x before its norms and GELUs ran on kernels.py's; the spread is the
  machine's), ORT's own `quantize_dynamic` defaults 0.130-0.183 (ours 0.75-1.03x its latency), 3.97x
  smaller, no accuracy drop. torch.ao's dynamic int8 was 2.6x; torchao
  int8 without torch.compile was slower than fp32 (0.68x) and with it 0.40x here.
- Linear-heavy transformer b32 (d_model 512, 16 tokens): torch fp32 23.3-25.4, dynamic 3.4-3.9
  (6.46x, 6.68x, 6.96x in the same three runs), ORT's defaults 4.9-6.6, static 4.3-5.0x, 3.98x smaller, drop 0-0.2
  points (of a model at 0.33 accuracy: it learns little from 16 pooled pixels, so that drop says little).
- Zoo transformer b32: torch fp32 2.91-3.37, dynamic 0.93-1.28 (2.63x, 2.81x, 3.17x in the same
  three runs; 2.88-3.04x in four earlier full runs of this code's first versions), the same graph on
  ONNX Runtime's own norm and GELU kernels 1.86-2.37x in the same runs, ORT's defaults 1.04-1.62x;
  3.56x smaller, accuracy drop -0.2 points. The lowest figures are from a run while the machine ran
  ~1.4x slower (another tenant's load). The gain is
  `kernels.py`: ORT's CPU LayerNormalization / RMSNormalization sum each row in one scalar chain
  (67-80 us on [32, 64, 64], torch 37; ours 10-25, with the residual Add before them); its Gelu
  calls erf per element (58 us on [32, 64, 128], ours ~30). Before them: 2.11-2.16x with the
  attention as q/k/v projections + ONNX's Attention, the tables widened once at load and the
  stream's LayerNorms as RMSNormalization; 1.95x with a Split and per-call table dequantization;
  1.48x before the fusion and session changes (2.91x smaller before compact.py). What is left in
  its int8 graph (ORT profile, 2 threads): Attention ~35 % (float: ORT's kernel is near this CPU's
  FP32 peak for head size 16; int8 Q.K^T was slower), int8 MatMuls with their dynamic quantization
  ~35 %, GELU ~10 %, norms ~10 %.
- Options chosen by measuring: signed int8 weights (unsigned 30 % slower), per-tensor (per-channel
  10 % slower, no accuracy gain), no reduce_range (no effect on VNNI); dynamic leaves Conv float
  (ORT's ConvInteger made the zoo CNN 27x slower); static is QDQ (ORT fuses the pairs at load and
  leaves float what has no int8 kernel) and keeps the node that writes the output float (quantizing
  the output itself cost 0.07 RMSE on a target of scale 3). What the int8 variants leave float is
  stored small (compact.py): tables (embeddings, positions) int8, vectors (biases, norms) half, no
  shape annotations or long names: the artifact shrinks, the graph computes nearly the same.
- `fp16`: `model.half()` computes in half, which this CPU cannot do natively (0.12-0.40x float);
  torch fp16 weights widened at load only halve the file. Stored half behind a Cast that ORT folds
  at load, it runs as the float graph in ORT (MLP 1.4-2.6x torch fp32) at half the size.
- Session (onnx_graph.session_for, the one every variant runs with): all graph optimisations,
  sequential, memory pattern + arena, torch's thread count; pool threads spin inside a call and stop
  when it returns (`session.force_spinning_stop`): MLP b32 best 0.110 ms vs 0.157 with no spinning;
  stopping at return is for torch between ORT calls (left spinning after a call, it ran 1.5x slower).
  ORT's SkipLayerNormFusion is off: its CPU SkipLayerNormalization took 540 us where the Add and
  LayerNormalization it replaces took 83 ([32, 64, 64]).
- Every zoo model exports and quantizes (the transformer's static int8 too, which torch.ao could not);
  a model the exporter cannot trace (data-dependent control flow) or with no weight int8 reaches is
  reported unavailable with the reason, never faked.

Where things live: `variants.py` (the variant names, their error, the artifact formats),
`attention.py` (the transformer's encoder layers made exportable), `fusion.py` (their exported
attention blocks as q, k, v projections + ONNX's Attention on 3-D inputs), `compact.py` (what int8
leaves float, stored small), `prenorm.py` (a pre-norm residual stream's LayerNorms as
RMSNormalization), `kernels.py` (norms and their residual Adds on Retrainer's vectorized ONNX Runtime
kernels, C in `native/`, when a session is made), `onnx_graph.py` (export, the checks a loaded
graph must pass, `OnnxModule`), `transforms.py` (`quantize`: how each variant is built),
`weights.py` (the float weights inside a variant, for warm starts), `selection.py` (`MetricBudget`,
scores, the selection rule, `quantize_and_select`), `persistence.py` (`save_quantized` /
`load_quantized`, and what happens to torch.ao artifacts). Import from this package; the names below
are its public interface.
"""

from ml.quantization.attention import swap_encoder_layers
from ml.quantization.onnx_graph import OnnxModule
from ml.quantization.persistence import SavedVariant, load_quantized, save_quantized, serialized_size
from ml.quantization.selection import (
    MetricBudget,
    QuantizationOutcome,
    QuantizationReport,
    VariantResult,
    VariantScore,
    quantize_and_select,
    select_variant,
)
from ml.quantization.transforms import quantize, quantize_each
from ml.quantization.variants import FORMAT, ONNX_FORMAT, VARIANTS, QuantizationUnavailableError, Variant, variants_for
from ml.quantization.weights import float_weights

__all__ = [
    "FORMAT",
    "ONNX_FORMAT",
    "VARIANTS",
    "MetricBudget",
    "OnnxModule",
    "QuantizationOutcome",
    "QuantizationReport",
    "QuantizationUnavailableError",
    "SavedVariant",
    "Variant",
    "VariantResult",
    "VariantScore",
    "float_weights",
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
