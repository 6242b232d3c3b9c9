"""all-MiniLM-L6-v2 fine-tuned as a text classifier: fp32 vs dynamic int8 (ONNX Runtime), side by side.

Fine-tunes `ml.models:PretrainedTextClassifier` (the last encoder layer and the head) briefly on the
demo topics data (ml/demo_text.py), builds the `dynamic` variant with `ml.quantization.quantize`
(the path `quantization.type: dynamic` takes in a pipeline; and the same graph on ONNX Runtime's own
norm and GELU kernels instead of Retrainer's, ml/quantization/kernels.py), and measures them
round-robin (each round times every model in turn, in a seeded random order, so drift in the
machine's load hits them alike): latency p50/p99 at batch 1 and 32, accuracy on held-out rows,
artifact size.

    .venv/bin/python bench/minilm.py [--rows 450] [--length 32] [--rounds 30]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from torch import nn

from ml.demo_text import topic_sentences
from ml.models import PretrainedTextClassifier
from ml.quantization import OnnxModule, QuantizationUnavailableError, kernels, quantize, serialized_size
from ml.text import TextTokenizer


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 16) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=generator).split(batch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        predicted = torch.cat([model(rows).argmax(dim=1) for rows in x.split(32)])
    return float((predicted == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=450)
    parser.add_argument("--length", type=int, default=32, help="tokens per row (model.input_shape [T])")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    texts, labels = topic_sentences(args.rows)
    ids = torch.from_numpy(TextTokenizer.for_data(None, [args.length]).encode(texts).astype(np.float32))
    y = torch.tensor(labels)
    cut = int(0.75 * len(y))
    model = PretrainedTextClassifier([args.length], 3, train_last_layers=1)
    started = time.perf_counter()
    fine_tune(model, ids[:cut], y[:cut], args.epochs)
    print(f"fine-tuned on {cut} rows x {args.epochs} epochs in {time.perf_counter() - started:.1f} s")

    variants: dict[str, nn.Module] = {"fp32 (torch)": model}
    try:
        started = time.perf_counter()
        quantized = quantize(model, "dynamic", [ids[:32]])
        variants["dynamic int8 (ORT)"] = quantized
        print(f"exported and quantized in {time.perf_counter() - started:.1f} s")
        if isinstance(quantized, OnnxModule) and kernels.library() is not None:
            # the same graph on ONNX Runtime's own LayerNorm and GELU kernels instead of Retrainer's
            variants["  on ORT's kernels"] = OnnxModule(
                quantized.onnx_bytes, variant="dynamic", parameter_count=quantized.parameter_count, own_kernels=False
            )
    except QuantizationUnavailableError as e:
        print(f"dynamic int8 unavailable: {e}")

    batches = {1: ids[cut : cut + 1], 32: ids[cut : cut + 32]}
    times: dict[tuple[str, int], list[float]] = {(name, b): [] for name in variants for b in batches}
    with torch.inference_mode():
        for variant in variants.values():  # warm-up
            for rows in batches.values():
                variant(rows)
        for round_index in range(args.rounds):
            # a seeded random order each round: the model timed right after torch's runs in the wake of
            # its spinning OpenMP threads, so a fixed order would always slow the same one
            order = list(variants.items())
            random.Random(round_index).shuffle(order)  # noqa: S311 (an order, not a secret)
            for name, variant in order:
                for size, rows in batches.items():
                    start = time.perf_counter()
                    variant(rows)
                    times[(name, size)].append((time.perf_counter() - start) * 1000)

    print(f"\nMiniLM-L6 classifier, T={args.length}, {len(y) - cut} held-out rows, {args.rounds} rounds")
    print(f"{'variant':<20} {'acc':>6} {'b1 p50':>8} {'b1 p99':>8} {'b32 p50':>9} {'b32 p99':>9} {'MB':>7}")
    base = percentile(times[("fp32 (torch)", 32)], 50)
    for name, variant in variants.items():
        b1, b32 = times[(name, 1)], times[(name, 32)]
        size = serialized_size(variant, "none" if name.startswith("fp32") else "dynamic") / 1e6
        print(
            f"{name:<20} {accuracy(variant, ids[cut:], y[cut:]):>6.3f} {percentile(b1, 50):>8.2f} "
            f"{percentile(b1, 99):>8.2f} {percentile(b32, 50):>9.2f} {percentile(b32, 99):>9.2f} {size:>7.1f}"
            f"   ({base / percentile(b32, 50):.2f}x fp32 at b32)"
        )


if __name__ == "__main__":
    main()
