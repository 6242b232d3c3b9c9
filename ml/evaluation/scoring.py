"""`evaluate`: one pass of a classifier over a labelled set, on CPU, into an `EvalReport`.

Quality metrics come from the per-example evidence through the same vectorised code `compare`
resamples (ml/evaluation/resampling.py), cost figures from ml/evaluation/cost.py, user metrics from
ml/evaluation/custom_metrics.py.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from domain.errors import InvalidInputError
from ml.evaluation.cost import latency_percentiles, parameter_count, state_dict_size
from ml.evaluation.custom_metrics import call_custom_metric, resolve_custom_metrics
from ml.evaluation.report import EvalReport
from ml.evaluation.resampling import BUILTIN_METRICS, Evidence, resample, safe_divide


def evaluate(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    batch_size: int = 256,
    custom_metrics: Sequence[str] = (),
    measure_latency: bool = True,
    latency_budget_s: float = 2.0,
    data_fingerprint: str | None = None,
) -> EvalReport:
    """Evaluates a classifier that maps `features` to logits of width `num_classes`, on CPU.

    The model runs in eval mode under `torch.inference_mode()`; its previous train/eval mode is
    restored afterwards. `custom_metrics` are `"package.module:function"` paths, each called as
    `fn(labels, predictions, probabilities) -> float` and stored under the function's name.
    `latency_budget_s` is shared by the batch-1 and batch-32 measurements; each still gets at
    least 50 timed repetitions, so a slow model can exceed it.

    Quality metrics: accuracy, macro_f1, log_loss, ece, and the ranking metrics roc_auc and
    pr_auc (binary: class 1's probability; more classes: macro one-vs-rest). A ranking metric is
    NaN when the labels hold one class only: no pair to rank, and 0.5 would be a made-up number.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidInputError(f"num_classes must be an integer >= 2 (got {num_classes!r})")
    check_run_arguments(batch_size, latency_budget_s)
    label_array = _checked_labels(features, labels, num_classes)
    check_on_cpu(model)
    resolved = resolve_custom_metrics(custom_metrics)

    with inference(model):
        probabilities = _predict_probabilities(model, features, num_classes, batch_size)
        costs = cost_metrics(model, features, latency_budget_s, measure_latency)

    # Argmax of the stored probabilities (not the logits) keeps the evidence self-consistent:
    # a prediction is always the class whose stored probability is the confidence used by ECE.
    predictions = probabilities.argmax(axis=1).astype(np.int64)
    evidence = Evidence.build(label_array, predictions, probabilities)
    identity = np.arange(label_array.size)[None, :]
    confusion = np.bincount(label_array * num_classes + predictions, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )

    # roc_auc and pr_auc are NaN when the labels hold one class only (ml/evaluation/ranking.py).
    metrics = {name: float(values[0]) for name, values in resample(evidence, identity, list(BUILTIN_METRICS)).items()}
    metrics.update(costs)
    for path, (name, fn) in resolved.items():
        metrics[name] = call_custom_metric(path, fn, label_array, predictions, probabilities)

    return EvalReport(
        metrics=metrics,
        per_class=_per_class(confusion),
        confusion_matrix=confusion.tolist(),
        labels=label_array,
        predictions=predictions,
        probabilities=probabilities,
        # A caller that feeds each model its own preprocessing of the same raw rows (the champion
        # keeps the standardizer it was trained with) vouches for "same data" with the raw rows' id.
        data_fingerprint=data_fingerprint or fingerprint(features, label_array),
    )


def fingerprint(features: torch.Tensor, targets: npt.NDArray[Any]) -> str:
    """sha256 of the evaluated features and labels (or regression targets): what "same data" means to `compare`."""
    # Labels alone cannot tell two evaluation sets apart when they share a label vector (e.g. the
    # same split with re-processed features); the gate must refuse those too.
    digest = hashlib.sha256()
    array = features.detach().cpu().contiguous().numpy()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    digest.update(np.ascontiguousarray(targets).tobytes())
    return digest.hexdigest()


def check_run_arguments(batch_size: int, latency_budget_s: float) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer (got {batch_size!r})")
    if not (math.isfinite(latency_budget_s) and latency_budget_s >= 0):
        raise InvalidInputError(f"latency_budget_s must be a finite number >= 0 (got {latency_budget_s!r})")


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode under `torch.inference_mode()`, restoring the model's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def cost_metrics(
    model: nn.Module, features: torch.Tensor, latency_budget_s: float, measure_latency: bool
) -> dict[str, float]:
    """Latency percentiles (when measured), serialized size and parameter count, as report metrics."""
    metrics = latency_percentiles(model, features, latency_budget_s) if measure_latency else {}
    metrics["size_bytes"] = float(state_dict_size(model))
    metrics["parameter_count"] = float(parameter_count(model))
    return metrics


def _checked_labels(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> npt.NDArray[np.int64]:
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise InvalidInputError("features and labels must be torch tensors")
    if features.ndim == 0 or features.shape[0] == 0:
        raise InvalidInputError("features is empty; evaluation needs at least one labelled example")
    if labels.ndim != 1:
        raise InvalidInputError(f"labels must be a 1-D tensor of class indices (got shape {tuple(labels.shape)})")
    if labels.shape[0] != features.shape[0]:
        raise InvalidInputError(
            f"features has {features.shape[0]} rows but labels has {labels.shape[0]}; they must pair up one to one"
        )
    values = labels.detach().cpu()
    if values.is_floating_point():
        # Our data path stores every tensor as float; integral floats are fine, 1.5 is not a class.
        if not bool(torch.isfinite(values).all()) or not bool((values == values.round()).all()):
            raise InvalidInputError("labels must be whole class indices; found non-integer values")
    elif values.dtype == torch.bool or values.is_complex():
        raise InvalidInputError(f"labels must be integer class indices (got dtype {values.dtype})")
    label_array = values.to(torch.int64).numpy().astype(np.int64, copy=True)
    low, high = int(label_array.min()), int(label_array.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise InvalidInputError(
            f"labels must lie in [0, {num_classes}) for num_classes={num_classes} (found {bad}); "
            "check num_classes or the label encoding"
        )
    return label_array


def check_on_cpu(model: nn.Module) -> None:
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices - {"cpu"}:
        raise InvalidInputError(
            f"evaluation runs on CPU but the model has tensors on {sorted(devices - {'cpu'})}; pass model.cpu()"
        )


def _predict_probabilities(
    model: nn.Module, features: torch.Tensor, num_classes: int, batch_size: int
) -> npt.NDArray[np.float32]:
    features = features.detach().cpu()
    chunks: list[torch.Tensor] = []
    for start in range(0, features.shape[0], batch_size):
        batch = features[start : start + batch_size]
        logits = model(batch)
        if not isinstance(logits, torch.Tensor) or logits.shape != (batch.shape[0], num_classes):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InvalidInputError(
                f"model output must be logits of shape (batch, num_classes={num_classes}) (got {shape}); "
                "check num_classes against the model's output layer"
            )
        # -inf logits are a legitimate way to mask a class out; NaN or +inf mean the model is broken.
        if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
            raise InvalidInputError(
                f"model produced NaN or +inf outputs for rows {start}..{start + batch.shape[0] - 1}; "
                "check the inputs for NaN and the weights for divergence"
            )
        # Softmax in float64: float32 softmax of large logits loses the small probabilities log-loss needs.
        probabilities = torch.softmax(logits.double(), dim=1)
        if not bool(torch.isfinite(probabilities).all()):
            raise InvalidInputError(
                f"model outputs for rows {start}..{start + batch.shape[0] - 1} give no valid probabilities "
                "(a row of all -inf logits?)"
            )
        chunks.append(probabilities.float())
    return torch.cat(chunks).numpy().astype(np.float32, copy=True)


def _per_class(confusion: npt.NDArray[np.int64]) -> dict[str, dict[str, float]]:
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    precision = safe_divide(tp, predicted)
    recall = safe_divide(tp, support)
    f1 = safe_divide(2 * tp, support + predicted)
    return {
        str(cls): {
            "precision": float(precision[cls]),
            "recall": float(recall[cls]),
            "f1": float(f1[cls]),
            "support": float(support[cls]),
        }
        for cls in range(confusion.shape[0])
    }
