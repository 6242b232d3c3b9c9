"""Overhead of `ml.training.train` against a minimal hand-written torch loop.

Same model (MLP 64→256→128→10), same synthetic data (8,192 rows), same batch (64), same
optimiser (AdamW) and the same number of steps. Each measurement is a fresh child process, so
peak RSS (ru_maxrss) belongs to one variant only; the variants alternate (ours, hand, hand,
ours, …) so drift on the machine hits both alike. Prints samples/s and peak RSS of both and
the ratios against the targets (throughput >= 0.95x, peak RSS <= 1.1x).

`--task regression` measures the same for a regression MLP (64→256→128→1, float targets
[N, 1], MSE; `train` on a `task: regression` spec, whose objective is MSE by default, against a
hand-written MSE loop).

    .venv/bin/python bench/train_overhead.py [--rounds 5] [--epochs 2] [--task classification|regression]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS, FEATURES, CLASSES, BATCH = 8192, 64, 10, 64


def _data(task: str) -> tuple[object, object]:
    import torch

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(ROWS, FEATURES, generator=generator)
    if task == "regression":  # already standardised, as ml.data.prepare hands them over
        return features, (features[:, :8].sum(dim=1, keepdim=True) / 8**0.5).tanh()
    labels = (features[:, :CLASSES].argmax(dim=1) + (features[:, -1] > 1).long()) % CLASSES
    return features, labels


def child(variant: str, epochs: int, task: str = "classification") -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import torch
    from torch import nn

    from domain.spec import parse_spec
    from ml.losses import Objective
    from ml.training import TrainingData, seed_everything, train
    from ml.zoo import build_model

    features, labels = _data(task)
    assert isinstance(features, torch.Tensor) and isinstance(labels, torch.Tensor)
    seed_everything(0)
    outputs = 1 if task == "regression" else CLASSES
    model = build_model("mlp", {"hidden_sizes": [256, 128], "dropout": 0.1}, [FEATURES], outputs)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if variant == "ours":
        spec = parse_spec(
            {
                "name": "bench",
                "dataset": "bench",
                "data": {"validation_fraction": 0.0, "test_fraction": 0.1},
                "task": task,
                "model": {"architecture": "mlp", "input_shape": [FEATURES]}
                | ({"outputs": 1} if task == "regression" else {"output_classes": CLASSES}),
                "hyperparameters": {
                    "optimizer": "adamw",
                    "learning_rate": 1e-3,
                    "weight_decay": 0.01,
                    "batch_size": BATCH,
                    "epochs": epochs,
                },
                "hardware": {"device": "cpu"},
            },
            source="bench",
        )
        empty = torch.empty(0, FEATURES)
        data = TrainingData(features, labels, empty, labels[:0])
        with tempfile.TemporaryDirectory() as checkpoints:
            train(model, data, spec, Path(checkpoints), resume=False, objective=Objective.for_spec(spec))
    else:  # the minimal loop an engineer would write by hand
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        loss_fn: nn.Module = nn.MSELoss() if task == "regression" else nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            order = torch.randperm(ROWS)
            for start in range(0, ROWS, BATCH):
                batch = order[start : start + BATCH]
                optimizer.zero_grad()
                loss_fn(model(features[batch]), labels[batch]).backward()
                optimizer.step()
    seconds = time.perf_counter() - started
    return {
        "samples_per_s": ROWS * epochs / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--child", choices=["ours", "hand"])
    parser.add_argument("--task", choices=["classification", "regression"], default="classification")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.epochs, args.task)))
        return

    results: dict[str, list[dict[str, float]]] = {"ours": [], "hand": []}
    for round_index in range(args.rounds):
        order = ["ours", "hand"] if round_index % 2 == 0 else ["hand", "ours"]
        for variant in order:
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--epochs", str(args.epochs), "--task", args.task],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    ours_tp, hand_tp = median("ours", "samples_per_s"), median("hand", "samples_per_s")
    ours_rss, hand_rss = median("ours", "peak_rss_mb"), median("hand", "peak_rss_mb")
    steps = args.epochs * -(-ROWS // BATCH)
    head, loss = ("1", "MSE") if args.task == "regression" else (str(CLASSES), "cross-entropy")
    print(
        f"\ntrain() overhead, {args.task}: MLP 64-256-128-{head}, {loss}, {ROWS} rows, batch {BATCH}, AdamW, "
        f"{steps} steps, {args.rounds} interleaved rounds (medians)\n"
    )
    print(f"{'':<22}{'samples/s':>12}{'peak RSS MB':>14}")
    print(f"{'hand-written loop':<22}{hand_tp:>12.0f}{hand_rss:>14.0f}")
    print(f"{'ml.training.train':<22}{ours_tp:>12.0f}{ours_rss:>14.0f}")
    tp_ratio, rss_ratio = ours_tp / hand_tp, ours_rss / hand_rss
    print(f"{'ratio (ours / hand)':<22}{tp_ratio:>11.3f}x{rss_ratio:>13.3f}x")
    print(
        f"\ntargets: throughput >= 0.95x: {'met' if tp_ratio >= 0.95 else 'NOT met'}; "
        f"peak RSS <= 1.1x: {'met' if rss_ratio <= 1.1 else 'NOT met'}"
    )
    spread = {v: [round(r["samples_per_s"]) for r in results[v]] for v in results}
    print(f"per-round samples/s: {spread}")


if __name__ == "__main__":
    main()
