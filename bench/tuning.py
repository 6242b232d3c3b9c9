"""Hyperparameter search with the median pruner vs without, side by side in one run.

The pipeline's own search (`flows.tuning.search`: the Optuna study in a SQLite metadata DB, one
Prefect task per trial under a temporary Prefect server) on the digits MLP (all 1,797 rows: digits
v2): the same search space
(learning rate 1e-5..3e-2 log-uniform, hidden width 16..128), the same trial budget and the same
sampler seeds for both; the rounds alternate (none, median, median, none, …) so drift on the machine
hits both alike. Prints finished trials per minute, wall time, pruned trials and the best
validation accuracy found.

    .venv/bin/python bench/tuning.py [--trials 8] [--epochs 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC: dict[str, Any] = {
    "name": "digits-tuning",
    "dataset": "digits",
    "data": {"format": "csv", "target": "label", "validation_fraction": 0.15, "test_fraction": 0.2, "seed": 7},
    "model": {"architecture": "mlp", "params": {"hidden_sizes": [64]}, "input_shape": [64], "output_classes": 10},
    "hyperparameters": {"optimizer": "adamw", "batch_size": 32},
    "hardware": {"device": "cpu"},
    "tuning": {
        "search_space": {
            "hyperparameters.learning_rate": {"type": "loguniform", "low": 1e-5, "high": 3e-2},
            "model.params.hidden_sizes": {"type": "choice", "choices": [[16], [32], [64], [128]]},
        },
        "metric": "val_accuracy",
        "sampler": "tpe",
        "pruner_startup_trials": 2,
    },
}


def one_search(pruner: str, round_index: int, trials: int, epochs: int, csv: Path) -> dict[str, Any]:
    from domain import entities as e
    from domain.spec import parse_spec
    from flows.context import FlowContext
    from flows.tuning import search
    from ml.data import prepare
    from ml.loaders import load_data
    from ml.zoo import constructor_problems
    from storage import repositories as repo

    document = copy.deepcopy(SPEC)
    document["hyperparameters"]["epochs"] = epochs
    document["tuning"].update({"pruner": pruner, "trials": trials})
    document["data"]["seed"] = 7 + round_index  # both pruners see the same seeds, round by round
    spec = parse_spec(document, source="bench", param_checker=constructor_problems)
    ctx = FlowContext.open()
    try:
        with ctx.tx() as session:
            repo.upsert_pipeline(session, spec.name, spec.dataset, spec.to_document())
            run, _ = repo.create_run(session, spec.name, e.TriggerKind.MANUAL, reason=f"bench {pruner}")
        table = load_data(csv, spec.data, task=spec.task)
        splits = spec.data.model_dump(include={"validation_fraction", "test_fraction", "seed"})
        data = prepare(table, input_shape=[64], output_classes=10, **splits)
        started = time.perf_counter()
        search(ctx, spec, data, run.id)
        seconds = time.perf_counter() - started
        with ctx.tx() as session:
            record = (repo.get_run(session, run.id).evidence or {})["tuning"]
    finally:
        ctx.close()
    states = [t["state"] for t in record["trials"]]
    return {
        "seconds": seconds,
        "finished": len(states),
        "pruned": states.count("PRUNED"),
        "best": record["best"]["value"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import logging

    import migrations
    from ml.demo_data import digits_versions

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        url = f"sqlite:///{root / 'retrainer.db'}"
        os.environ.update(
            RETRAINER_DATABASE_URL=url,
            RETRAINER_ARTIFACT_ROOT=f"file://{root / 'artifacts'}",
            RETRAINER_HOME_DIR=str(root / "home"),
        )
        migrations.upgrade(url)
        csv = digits_versions(root / "digits")["v2"]  # all 1,797 rows, clean labels
        from prefect import flow
        from prefect.testing.utilities import prefect_test_harness

        logging.getLogger("optuna").setLevel(logging.WARNING)
        results: dict[str, list[dict[str, Any]]] = {"none": [], "median": []}
        with prefect_test_harness(server_startup_timeout=120):
            for round_index in range(args.rounds):
                order = ("none", "median") if round_index % 2 == 0 else ("median", "none")
                for pruner in order:
                    in_a_flow = flow(name=f"bench-tuning-{pruner}", validate_parameters=False)(one_search)
                    result = in_a_flow(pruner, round_index, args.trials, args.epochs, csv)
                    results[pruner].append(result)
                    print(f"round {round_index + 1} pruner={pruner}: {result}", file=sys.stderr)

    print(f"\ndigits MLP, {args.trials} trials x {args.epochs} epochs, TPE, {args.rounds} rounds (sums / medians)")
    print("| pruner | trials finished | pruned | wall s | trials / min | best val_accuracy (median of rounds) |")
    print("|---|---|---|---|---|---|")
    rate: dict[str, float] = {}
    for pruner, rows in results.items():
        finished = sum(r["finished"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        rate[pruner] = 60 * finished / seconds
        best = statistics.median(r["best"] for r in rows)
        pruned = sum(r["pruned"] for r in rows)
        print(f"| {pruner} | {finished} | {pruned} | {seconds:.1f} | {rate[pruner]:.1f} | {best:.4f} |")
    print(f"\nmedian pruner: {rate['median'] / rate['none']:.2f}x the trials per minute of no pruning")


if __name__ == "__main__":
    main()
