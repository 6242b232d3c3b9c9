"""What a pipeline's `task` decides (CONTRACT section 2): the metrics its gates may name, the
losses and validation monitors training accepts, and the spec keys that belong to one task only.

`classification` (the default) predicts a class id out of `model.output_classes`; `regression`
predicts `model.outputs` floats per row (one per `data.target` column). The tables below are the
one place these lists live: the spec's validation (domain/spec.py), the objective (ml/losses.py)
and the gates all read them, so a metric or loss added here is accepted everywhere at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from domain.spec import PipelineSpec

Task = Literal["classification", "regression"]
TASKS: tuple[Task, ...] = ("classification", "regression")

# Quality metrics of each task, with whether a larger value is better.
QUALITY_METRICS: dict[Task, dict[str, bool]] = {
    "classification": {
        "accuracy": True,
        "macro_f1": True,
        "log_loss": False,
        "ece": False,
        "roc_auc": True,
        "pr_auc": True,
    },
    "regression": {"rmse": False, "mae": False, "r2": True, "mape": False},
}
# What every model costs, whatever its task (all: lower is better).
COST_METRICS = (
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_p50_ms_b1",
    "latency_p99_ms_b1",
    "latency_p50_ms_b32",
    "latency_p99_ms_b32",
    "size_bytes",
    "parameter_count",
)
BUILTIN_LOSSES: dict[Task, tuple[str, ...]] = {
    "classification": ("cross_entropy",),
    "regression": ("mse", "mae", "huber"),
}
DEFAULT_LOSS: dict[Task, str] = {"classification": "cross_entropy", "regression": "mse"}
MONITORS: dict[Task, tuple[str, ...]] = {
    "classification": ("val_loss", "val_accuracy"),
    "regression": ("val_loss", "val_rmse", "val_mae"),
}
DEFAULT_MAX_ACCURACY_DROP = 0.01  # quantization.max_accuracy_drop's default
# A regression canary's prediction drift counts predictions in this many bins, cut at the
# champion's prediction quantiles on its test rows (equal shares under the champion).
REGRESSION_DRIFT_BINS = 10


def other_task(task: Task) -> Task:
    return "classification" if task == "regression" else "regression"


def task_metrics(task: Task) -> tuple[str, ...]:
    """The built-in metrics a gate of this task may name: its quality metrics, then the costs."""
    return (*QUALITY_METRICS[task], *COST_METRICS)


def metric_problem(task: Task, metric: str, known: set[str]) -> str | None:
    """Why `metric` cannot be gated on in a `task` pipeline whose known metrics are `known`; None if it can."""
    if metric in known:
        return None
    if metric in QUALITY_METRICS[other_task(task)]:
        return (
            f"{metric} is a {other_task(task)} metric but the task is {task}; use "
            f"{', '.join(QUALITY_METRICS[task])} (or set task: {other_task(task)})"
        )
    import difflib

    close = difflib.get_close_matches(metric, sorted(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown metric{hint}; known: {', '.join(sorted(known))}"


def task_problems(spec: PipelineSpec) -> list[str]:
    """Lines "key.path: problem" for keys that do not fit the spec's task (empty when all fit)."""
    task, model, hp, quantization = spec.task, spec.model, spec.hyperparameters, spec.quantization
    problems: list[str] = []
    if task == "classification":
        if model.output_classes is None:
            problems.append("model.output_classes: required for classification (the number of classes, >= 2)")
        if model.outputs is not None:
            problems.append(
                "model.outputs: is the output width of a regression model; a classifier has "
                "model.output_classes (or set task: regression)"
            )
        if len(spec.data.target_columns) > 1:
            problems.append(
                f"data.target: lists {len(spec.data.target_columns)} columns but a classifier predicts one "
                "class column; name one column (or set task: regression for several float targets)"
            )
    else:
        if model.output_classes is not None:
            problems.append(
                "model.output_classes: a regression model has model.outputs (default 1, one per data.target "
                "column), not classes; remove output_classes"
            )
        width, columns = model.outputs or 1, spec.data.target_columns
        if spec.data.loader is None and width != len(columns):
            problems.append(
                f"model.outputs: is {width} but data.target names {len(columns)} column(s) {columns}; "
                f"set model.outputs to {len(columns)}"
            )
        if hp.label_smoothing:
            problems.append("hyperparameters.label_smoothing: applies to classification only; remove it")
    other = other_task(task)
    if hp.loss_function in BUILTIN_LOSSES[other]:
        problems.append(
            f"hyperparameters.loss_function: {hp.loss_function!r} is a {other} loss but the task is {task}; use "
            f"{' / '.join(BUILTIN_LOSSES[task])} or a loss by import path 'package.module:function'"
        )
    monitor = hp.early_stopping.monitor if hp.early_stopping is not None else "val_loss"
    if monitor not in MONITORS[task]:
        problems.append(
            f"hyperparameters.early_stopping.monitor: {monitor!r} is not a {task} validation metric; "
            f"use {' / '.join(MONITORS[task])}"
        )
    problems += _quantization_problems(task, quantization.type, quantization.max_metric_drop, quantization)
    return problems


def _quantization_problems(task: Task, kind: str, budget: dict[str, float] | None, section: object) -> list[str]:
    key = "quantization.max_metric_drop"
    # compared with the default, not "was it written": a stored spec (to_document) writes every key
    explicit_accuracy = getattr(section, "max_accuracy_drop", DEFAULT_MAX_ACCURACY_DROP) != DEFAULT_MAX_ACCURACY_DROP
    if task == "regression" and explicit_accuracy:
        return [f"quantization.max_accuracy_drop: a regression model has no accuracy; use {key}, e.g. {{rmse: 0.5}}"]
    if budget is None:
        if task == "regression" and kind != "none":
            return [
                f"{key}: a regression model's quantization needs a budget on one metric, e.g. {{rmse: 0.5}} "
                f"(the most its {', '.join(QUALITY_METRICS[task])} may worsen, in the target's units)"
            ]
        return []
    problems = []
    if explicit_accuracy:
        problems.append(
            "quantization.max_accuracy_drop: set either max_accuracy_drop or max_metric_drop, not both; "
            "max_metric_drop {accuracy: X} says the same"
        )
    if len(budget) != 1:
        problems.append(f"{key}: names exactly one metric, e.g. {{rmse: 0.5}} (got {len(budget)})")
    for metric in budget:
        if metric not in QUALITY_METRICS[task]:
            problems.append(
                f"{key}.{metric}: not a {task} quality metric; use one of {', '.join(QUALITY_METRICS[task])}"
            )
    return problems
