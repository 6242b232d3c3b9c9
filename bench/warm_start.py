"""Warm start vs scratch: epochs and wall time to reach the same validation metric on new data.

The situation `model.init: {from: champion}` is for: a champion trained on the first data drop
(`v1`, 60 % of the rows), and a retrain on the next drop (`v2`, all rows). Both retrains use the
same spec, seed, batch and epoch budget; the warm one starts from the champion's weights and keeps
its standardizer (as flows/warm_start.py does), the scratch one starts from random weights. The
target is what scratch reaches at its best over the whole budget (less a small tolerance); the
table gives, for each, the first epoch at or past the target and the training time until then.
v1's rows are part of v2, so some of v2's validation rows were the champion's training rows: the
same holds for a warm start in production, where each data drop extends the last.

Tasks: the digits classifier (val_accuracy) and the diabetes regression (val_rmse, lower is better).

    .venv/bin/python bench/warm_start.py [--epochs 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _spec(task: str, epochs: int) -> Any:
    from domain.spec import parse_spec

    model: dict[str, Any] = {"architecture": "mlp", "params": {"hidden_sizes": [128, 64], "dropout": 0.0}}
    if task == "regression":
        model |= {"input_shape": [10], "outputs": 1}
        data = {"target": "progression", "validation_fraction": 0.2, "test_fraction": 0.15, "seed": 7}
    else:
        model |= {"input_shape": [64], "output_classes": 10}
        data = {"target": "label", "validation_fraction": 0.2, "test_fraction": 0.15, "seed": 7}
    document = {
        "name": "bench",
        "task": task,
        "dataset": "bench",
        "data": data,
        "model": model,
        "hyperparameters": {"learning_rate": 0.002, "batch_size": 32, "epochs": epochs},
        "hardware": {"device": "cpu"},
    }
    return parse_spec(document, source="bench")


def _train(spec: Any, data: Any, state: dict[str, Any] | None) -> tuple[list[float], list[float]]:
    """(validation metric per epoch, cumulative training seconds per epoch)."""
    from ml.losses import Objective
    from ml.training import seed_everything, train
    from ml.zoo import build_for_spec

    seed_everything(0)
    model = build_for_spec(spec)
    if state is not None:
        model.load_state_dict(state)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = train(
            model, data.training_data(), spec, Path(folder), resume=False, objective=Objective.for_spec(spec)
        )
        total = time.perf_counter() - started
    metric = "val_rmse" if spec.task == "regression" else "val_accuracy"
    values = [float(m.monitored(metric) or 0.0) for m in result.history]
    seconds = [sum(m.seconds for m in result.history[: i + 1]) for i in range(len(result.history))]
    scale = total / seconds[-1] if seconds[-1] else 1.0  # epoch seconds exclude validation: spread the rest
    return values, [s * scale for s in seconds]


def _prepared(spec: Any, path: Path) -> tuple[Any, Any]:
    """(table, prepared data) as the flow reads and splits `path`."""
    from ml.data import prepare
    from ml.loaders import load_data

    table = load_data(path, spec.data, task=spec.task)
    data = prepare(
        table, input_shape=spec.model.input_shape, output_classes=spec.model.output_classes,
        validation_fraction=spec.data.validation_fraction, test_fraction=spec.data.test_fraction,
        seed=spec.data.seed, task=spec.task, outputs=spec.model.outputs,
    )  # fmt: skip
    return table, data


def _reach(values: list[float], seconds: list[float], target: float, higher: bool) -> tuple[str, str]:
    for epoch, (value, spent) in enumerate(zip(values, seconds, strict=True), start=1):
        if (value >= target) if higher else (value <= target):
            return str(epoch), f"{spent:.2f}"
    return "not reached", "-"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    from flows.warm_start import StartingWeights, with_champion_preprocessing
    from ml.demo_data import digits_versions
    from ml.demo_regression import diabetes_versions
    from ml.init_weights import InitReport
    from ml.losses import Objective
    from ml.training import seed_everything, train
    from ml.zoo import build_for_spec

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = {
            "classification": digits_versions(Path(folder) / "digits"),
            "regression": diabetes_versions(Path(folder) / "diabetes"),
        }
        for task, paths in files.items():
            spec = _spec(task, args.epochs)
            _, first = _prepared(spec, paths["v1"])
            seed_everything(0)
            with tempfile.TemporaryDirectory() as checkpoints:
                champion = train(
                    build_for_spec(spec), first.training_data(), spec, Path(checkpoints), resume=False,
                    objective=Objective.for_spec(spec),
                ).model  # fmt: skip
            state = {k: v.detach().clone() for k, v in champion.state_dict().items()}
            table, data = _prepared(spec, paths["v2"])
            scratch = _train(spec, data, None)
            # the champion's preprocessing (and a regression champion's target scale), as the flow does
            start = StartingWeights(state, InitReport("champion"), first.standardizer, None, first.target_standardizer)
            warm = _train(spec, with_champion_preprocessing(start, data, table), state)
            higher = task == "classification"
            best = max(scratch[0]) if higher else min(scratch[0])
            target = best - 0.005 if higher else best * 1.01
            metric = "val_accuracy" if higher else "val_rmse"
            for name, (values, seconds) in (("scratch", scratch), ("warm start", warm)):
                epoch, spent = _reach(values, seconds, target, higher)
                rows.append(
                    (task, name, metric, f"{target:.4g}", epoch, spent, f"{values[0]:.4g}", f"{values[-1]:.4g}")
                )
    print(f"\nwarm start vs scratch: champion trained on v1 (60 %), retrained on v2 (all rows), {args.epochs} epochs\n")
    header = ("task", "start", "metric", "target", "epochs to target", "seconds to target", "after epoch 1", "final")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
