"""Quantized variants on this CPU: latency, size and accuracy, side by side.

Trains the zoo's MLP, CNN and transformer briefly on scikit-learn's bundled digits (no download),
builds every variant with `ml.quantization`, and measures them round-robin (each round times every
model in turn, so drift in the machine's load hits all of them alike). Reference rows that the
pipeline never chooses explain where speed comes from: fp16 computed in half (`model.half()`),
torchao int8 without torch.compile, the transformer with our attention path in float, and ONNX
Runtime (fp32 and its own int8 dynamic quantization) as a peer.

    .venv/bin/python bench/quantization.py
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from ml.quantization import (
    VARIANTS,
    Variant,
    VariantScore,
    quantize,
    quantize_each,
    select_variant,
    serialized_size,
    swap_encoder_layers,
)
from ml.zoo import build_model

SEED = 0
MAX_ACCURACY_DROP = 0.01  # the spec's default, for the "what the pipeline would choose" line
TARGETS = {"speedup_b32": 2.5, "size_ratio": 3.5, "drop_points": 0.5}
TARGET_ARCHITECTURES = ("mlp", "transformer")


@dataclass
class Architecture:
    name: str
    params: dict[str, object]
    input_shape: list[int]
    epochs: int
    lr: float
    tokens: bool  # inputs are the raw 0..16 pixel values as token ids, not scaled features


ARCHITECTURES = [
    # Wider than the zoo's default (128, 64): at that size a batch-32 forward is ~0.1 ms of call overhead.
    Architecture("mlp", {"hidden_sizes": [1024, 1024], "dropout": 0.1}, [64], epochs=10, lr=1e-3, tokens=False),
    Architecture("cnn", {"channels": [16, 32]}, [1, 8, 8], epochs=8, lr=3e-3, tokens=False),
    # Learning digits from pixel-value tokens is slow; 20 epochs (~20 s here) gets it to about 0.7.
    Architecture("transformer", {"vocab_size": 17, "dropout": 0.0}, [64], epochs=20, lr=3e-3, tokens=True),
]


@dataclass
class Row:
    name: str
    run: Callable[[np.ndarray], np.ndarray]  # float32 batch in, logits out
    size_bytes: int
    variant: Variant | None = None  # None: a reference row, never chosen by the pipeline
    note: str = ""
    times: dict[int, list[float]] = field(default_factory=lambda: {1: [], 32: []})
    accuracy: float = 0.0


def _torch_runner(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return run


def _state_size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _train(arch: Architecture, x: np.ndarray, y: np.ndarray) -> nn.Module:
    torch.manual_seed(SEED)
    model = build_model(arch.name, dict(arch.params), arch.input_shape, 10)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    optimiser = torch.optim.AdamW(model.parameters(), lr=arch.lr, weight_decay=1e-4)
    batches_per_epoch = -(-len(inputs) // 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, arch.lr, total_steps=arch.epochs * batches_per_epoch)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(arch.epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(32):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimiser.step()
            schedule.step()
    return model.eval()


class _Half(nn.Module):
    """fp16 computed in fp16: what `model.half()` really costs on a CPU without fp16 arithmetic."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()  # type: ignore[no-any-return]


def _torchao_rows(model: nn.Module) -> list[Row]:
    # torchao registers pytree constants at import and logs a deprecation line about it; not ours to fix.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as e:
        print(f"  torchao not importable ({e}); its rows are skipped")
        return []
    rows = []
    for label, config in (
        ("torchao int8 dyn-act (eager)", Int8DynamicActivationInt8WeightConfig()),
        ("torchao int8 weight-only (eager)", Int8WeightOnlyConfig()),
    ):
        quantized = copy.deepcopy(model)
        quantize_(quantized, config)
        rows.append(Row(label, _torch_runner(quantized), _state_size(quantized), note="reference"))
    return rows


def _onnx_rows(model: nn.Module, example: np.ndarray, folder: Path) -> tuple[list[Row], str]:
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        return [], f"onnxruntime not importable ({e})"
    folder.mkdir(parents=True, exist_ok=True)
    fp32_path, int8_path = folder / "model.onnx", folder / "model.int8.onnx"
    try:
        with warnings.catch_warnings():
            # The dynamo exporter needs onnxscript, which is not installed; the TorchScript exporter
            # works and announces its own deprecation, which this benchmark reports below instead.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.from_numpy(example),),
                str(fp32_path),
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
            # It logs a pre-processing tip on the root logger for every model; silenced for this call only.
            logging.disable(logging.WARNING)
            try:
                quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
            finally:
                logging.disable(logging.NOTSET)
    except Exception as e:  # any exporter failure is a finding to print, not a crash
        return [], f"ONNX export/quantization failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    rows = []
    for label, path in (("onnxruntime fp32", fp32_path), ("onnxruntime int8 dynamic", int8_path)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(x: np.ndarray, session: ort.InferenceSession = session) -> np.ndarray:
            return session.run(None, {"x": x})[0]  # type: ignore[no-any-return]

        rows.append(Row(label, run, path.stat().st_size, note="peer"))
    return rows, "legacy TorchScript exporter (torch.onnx dynamo exporter needs onnxscript, not installed)"


def _accuracy(row: Row, x: np.ndarray, y: np.ndarray) -> float:
    predictions = np.concatenate([row.run(x[i : i + 256]).argmax(axis=1) for i in range(0, len(x), 256)])
    return float((predictions == y).mean())


def _measure(rows: list[Row], x: np.ndarray, rounds: int, calls: dict[int, int]) -> None:
    batches = {batch: np.ascontiguousarray(x[:batch]) for batch in calls}
    for row in rows:  # warm-up: first calls pack weights, allocate, pick kernels
        for batch in batches.values():
            for _ in range(3):
                row.run(batch)
    gc.disable()  # a collection landing inside one row's timings would bias that row only
    try:
        for round_index in range(rounds):
            # Each round starts one row later, so no row is always the one timed first after a switch.
            shift = round_index % len(rows)
            for row in rows[shift:] + rows[:shift]:
                for batch, count in calls.items():
                    for _ in range(count):
                        start = time.perf_counter()
                        row.run(batches[batch])
                        row.times[batch].append((time.perf_counter() - start) * 1e3)
    finally:
        gc.enable()


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _bench(arch: Architecture, data: tuple[np.ndarray, ...], folder: Path, rounds: int) -> None:
    x_train, x_test, y_train, y_test = data
    if not arch.tokens:
        x_train, x_test = x_train / 16.0, x_test / 16.0
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    started = time.perf_counter()
    model = _train(arch, x_train, y_train)
    trained_s = time.perf_counter() - started
    calibration = [torch.from_numpy(x_train[i : i + 32]) for i in range(0, 32 * 16, 32)]

    rows: list[Row] = []
    built, unavailable = quantize_each(model, VARIANTS, calibration)
    for variant, quantized in built.items():
        name = "fp32 (none)" if variant == "none" else variant
        rows.append(Row(name, _torch_runner(quantized), serialized_size(quantized, variant), variant=variant))
    if arch.name in TARGET_ARCHITECTURES:
        half = _Half(model)
        rows.append(Row("fp16 computed in half", _torch_runner(half), _state_size(half.model)))
        rows += _torchao_rows(model)
    if arch.name == "transformer":
        float_attention = quantize(model, "none")
        swap_encoder_layers(float_attention)  # the dynamic variant's attention path, kept in float
        rows.append(Row("fp32 + our attention path", _torch_runner(float_attention), _state_size(float_attention)))
    onnx_rows, onnx_note = _onnx_rows(model, x_test[:2], folder)
    rows += onnx_rows

    for row in rows:
        row.accuracy = _accuracy(row, x_test, y_test)
    started = time.perf_counter()
    _measure(rows, x_test, rounds, calls={1: 20, 32: 10})
    measured_s = time.perf_counter() - started

    base = rows[0]
    base_b32 = statistics.median(base.times[32])
    params = ", ".join(f"{key}={value}" for key, value in arch.params.items())
    print(
        f"\n## {arch.name} ({params}; input_shape {arch.input_shape}; trained {arch.epochs} epochs in {trained_s:.0f}s)"
    )
    print(f"   {rounds} rounds x (20 calls at b1 + 10 at b32) per row, round-robin, measured in {measured_s:.0f}s")
    header = (
        f"| {'variant':40s} | b1 p50 | b1 p99 | b32 p50 | b32 p99 | speed-up b32 | {'size bytes':>10s} | size ratio "
        f"| accuracy | drop (pts) |"
    )
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for row in rows:
        b32 = statistics.median(row.times[32])
        label = row.name if row.variant else f"{row.name} [ref]"
        print(
            f"| {label:40s} | {_pct(row.times[1], 50):6.3f} | {_pct(row.times[1], 99):6.3f} | {b32:7.3f} "
            f"| {_pct(row.times[32], 99):7.3f} | {base_b32 / b32:11.2f}x | {row.size_bytes:10d} "
            f"| {base.size_bytes / row.size_bytes:9.2f}x | {row.accuracy:8.4f} "
            f"| {(base.accuracy - row.accuracy) * 100:+10.2f} |"
        )
    for variant, reason in unavailable.items():
        print(f"   {variant}: unavailable — {reason}")
    print(f"   ONNX: {onnx_note}")

    scores = {
        row.variant: VariantScore(row.accuracy, statistics.median(row.times[32]), row.size_bytes)
        for row in rows
        if row.variant
    }
    report = select_variant(scores, unavailable, MAX_ACCURACY_DROP)
    print(f"   pipeline choice at max_accuracy_drop={MAX_ACCURACY_DROP}: {report.chosen} — {report.reason}")

    if arch.name in TARGET_ARCHITECTURES:
        print(
            f"   targets (>= {TARGETS['speedup_b32']}x faster at b32, >= {TARGETS['size_ratio']}x smaller, "
            f"drop <= {TARGETS['drop_points']} points):"
        )
        for row in rows:
            if row.name not in ("dynamic", "static", "onnxruntime int8 dynamic"):
                continue
            speedup = base_b32 / statistics.median(row.times[32])
            ratio = base.size_bytes / row.size_bytes
            drop = (base.accuracy - row.accuracy) * 100
            checks = [
                f"speed-up {speedup:.2f}x {'met' if speedup >= TARGETS['speedup_b32'] else 'NOT met'}",
                f"size {ratio:.2f}x {'met' if ratio >= TARGETS['size_ratio'] else 'NOT met'}",
                f"drop {drop:+.2f} pts {'met' if drop <= TARGETS['drop_points'] else 'NOT met'}",
            ]
            print(f"     {row.name:26s} " + "; ".join(checks))


SWEEP = [
    ("mlp", {"hidden_sizes": [128, 64]}),
    ("mlp", {"hidden_sizes": [512, 256]}),
    ("mlp", {"hidden_sizes": [1024, 1024]}),
    ("mlp", {"hidden_sizes": [2048, 2048]}),
    ("transformer", {"vocab_size": 17}),
    ("transformer", {"vocab_size": 17, "d_model": 128, "dim_feedforward": 512}),
    ("transformer", {"vocab_size": 17, "d_model": 256, "dim_feedforward": 1024}),
]


def _width_sweep(rounds: int) -> None:
    """Where int8 starts to pay: batch-32 latency by layer width (untrained weights; latency does not
    depend on their values)."""
    print("\n## width sweep: b32 p50 ms (speed-up vs fp32), untrained weights, round-robin")
    generator = torch.Generator().manual_seed(SEED)
    for name, params in SWEEP:
        torch.manual_seed(SEED)
        model = build_model(name, dict(params), [64], 10).eval()
        rows = [Row(v, _torch_runner(quantize(model, v)), 0, variant=v) for v in ("none", "dynamic", "fp16")]
        if name == "transformer":
            float_attention = quantize(model, "none")
            swap_encoder_layers(float_attention)
            rows.append(Row("fp32 + our attention path", _torch_runner(float_attention), 0))
            x = torch.randint(0, 17, (32, 64), generator=generator).float().numpy()
        else:
            x = torch.randn(32, 64, generator=generator).numpy()
        _measure(rows, x, max(3, rounds // 2), calls={32: 8})
        base = statistics.median(rows[0].times[32])
        cells = [
            f"{r.name} {statistics.median(r.times[32]):.3f} ({base / statistics.median(r.times[32]):.2f}x)"
            for r in rows
        ]
        described = ", ".join(f"{k}={v}" for k, v in params.items() if k != "vocab_size") or "defaults"
        print(f"   {name:11s} {described:38s} " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="round-robin rounds per architecture")
    parser.add_argument("--only", choices=[a.name for a in ARCHITECTURES], help="one architecture")
    args = parser.parse_args()

    digits = load_digits()
    data = train_test_split(
        digits.data.astype(np.float32),
        digits.target.astype(np.int64),
        test_size=0.25,
        random_state=SEED,
        stratify=digits.target,
    )
    print(
        f"# Quantization on this CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"quantized engine {torch.backends.quantized.engine}; digits: {len(data[0])} train / {len(data[1])} test"
    )
    print("# latencies in ms per call; speed-up and size ratio vs fp32 (none); drop = fp32 accuracy - row, in points")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for arch in ARCHITECTURES:
            if args.only and arch.name != args.only:
                continue
            _bench(arch, tuple(data), Path(folder) / arch.name, args.rounds)  # type: ignore[arg-type]
    if not args.only:
        _width_sweep(args.rounds)
    print(f"\n# total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
