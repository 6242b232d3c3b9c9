"""`evaluate_regression`: one pass of a regression model over a set with float targets, on CPU,
into a `RegressionReport`.

The model's outputs are mapped back to the target's own units by the caller's `inverse` (the
target standardizer's inverse), so every metric, and every comparison with a champion that may
have been trained with another standardizer, is in the units the team reads. Quality metrics come
from the same vectorised code `compare` resamples (ml/evaluation/regression_metrics.py), cost
figures from ml/evaluation/cost.py, user metrics from ml/evaluation/custom_metrics.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from domain.errors import InvalidInputError
from ml.evaluation.custom_metrics import call_custom_metric, resolve_custom_metrics
from ml.evaluation.regression_metrics import REGRESSION_METRICS, RegressionEvidence, resample_regression
from ml.evaluation.report import RegressionReport
from ml.evaluation.scoring import check_on_cpu, check_run_arguments, cost_metrics, fingerprint, inference

# Maps model outputs [N, outputs] (float64) to the target's units, same shape: a standardizer's inverse.
InverseTransform = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]


def evaluate_regression(
    model: nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor | npt.NDArray[np.floating],
    *,
    inverse: InverseTransform | None = None,
    latency_budget_s: float = 2.0,
    data_fingerprint: str | None = None,
    custom_metrics: Sequence[str] = (),
    batch_size: int = 256,
    measure_latency: bool = True,
) -> RegressionReport:
    """Evaluates a model that maps `features` to `outputs` floats per row, on CPU.

    `targets` are in the target's own units, shape [N] (one output) or [N, outputs]; the model must
    return [batch, outputs] (or [batch] for one output). `inverse`, when given, maps the model's
    outputs to the target's units (None: the model predicts in those units already). The model
    runs once, batched, in eval mode under `torch.inference_mode()`; its train/eval mode is restored.

    Metrics: rmse, mae, r2 and mape, each macro-averaged over outputs (the unweighted mean of the
    per-output values), then the latency and size figures `evaluate` reports. A metric undefined on
    this data is NaN with its reason in `undefined_metrics`: mape when a target is 0, r2 when an
    output's targets are all equal; this never raises, so a default metric list cannot crash a run.
    `custom_metrics` are `"package.module:function"` paths, each called as
    `fn(targets, predictions) -> float` on float64 [N, outputs] arrays, stored under the function's name.
    """
    check_run_arguments(batch_size, latency_budget_s)
    target_array = _checked_targets(features, targets)
    check_on_cpu(model)
    resolved = resolve_custom_metrics(custom_metrics)

    with inference(model):
        outputs = _predict(model, features, target_array.shape[1], batch_size)
        costs = cost_metrics(model, features, latency_budget_s, measure_latency)
    predictions = _to_target_units(outputs, inverse)

    evidence = RegressionEvidence.build(target_array, predictions)
    identity = np.arange(target_array.shape[0])[None, :]
    resampled = resample_regression(evidence, identity, list(REGRESSION_METRICS))
    metrics = {name: float(values[0]) for name, values in resampled.items()}
    metrics.update(costs)
    for path, (name, fn) in resolved.items():
        metrics[name] = call_custom_metric(path, fn, target_array, predictions)

    return RegressionReport(
        metrics=metrics,
        targets=target_array,
        predictions=predictions,
        # As in `evaluate`: a caller feeding each model its own preprocessing of the same raw rows
        # vouches for "same data" with the raw rows' id.
        data_fingerprint=data_fingerprint or fingerprint(features, target_array),
        undefined_metrics=evidence.undefined_reasons(),
    )


def _checked_targets(
    features: torch.Tensor, targets: torch.Tensor | npt.NDArray[np.floating]
) -> npt.NDArray[np.float64]:
    if not isinstance(features, torch.Tensor):
        raise InvalidInputError("features must be a torch tensor")
    if features.ndim == 0 or features.shape[0] == 0:
        raise InvalidInputError("features is empty; evaluation needs at least one example with a target")
    raw = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.number) or np.iscomplexobj(raw):
        raise InvalidInputError(f"targets must be real numbers (got dtype {raw.dtype})")
    array = raw.astype(np.float64, copy=True)
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2 or array.shape[1] == 0:
        raise InvalidInputError(f"targets must have shape [N] or [N, outputs] (got {raw.shape})")
    if array.shape[0] != features.shape[0]:
        raise InvalidInputError(
            f"features has {features.shape[0]} rows but targets has {array.shape[0]}; they must pair up one to one"
        )
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise InvalidInputError(
            f"targets hold NaN or infinite values in {bad.size} row(s), first row {int(bad[0])}; "
            "drop or impute those rows before evaluating"
        )
    return array


def _predict(model: nn.Module, features: torch.Tensor, outputs: int, batch_size: int) -> npt.NDArray[np.float64]:
    features = features.detach().cpu()
    chunks = []
    for start in range(0, features.shape[0], batch_size):
        batch = features[start : start + batch_size]
        chunks.append(_checked_outputs(model(batch), range(start, start + batch.shape[0]), outputs))
    return torch.cat(chunks).numpy().astype(np.float64, copy=True)


def _checked_outputs(result: object, rows: range, outputs: int) -> torch.Tensor:
    """One batch's outputs as float64 [rows, outputs]; a wrong shape or a non-finite value is refused."""
    if isinstance(result, torch.Tensor) and outputs == 1 and result.ndim == 1:
        result = result.reshape(-1, 1)
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != (len(rows), outputs):
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise InvalidInputError(
            f"model output must have shape (batch, outputs={outputs}) to match the targets (got {got}); "
            "check the model's output width against the target columns"
        )
    if not bool(torch.isfinite(result).all()):
        raise InvalidInputError(
            f"model outputs for rows {rows.start}..{rows.stop - 1} hold NaN or infinite values: "
            "the model diverged or the inputs hold NaN"
        )
    return result.double()


def _to_target_units(outputs: npt.NDArray[np.float64], inverse: InverseTransform | None) -> npt.NDArray[np.float64]:
    if inverse is None:
        return outputs
    try:
        mapped = np.asarray(inverse(outputs.copy()), dtype=np.float64)
    except Exception as e:  # caller code: report it against the step it broke, never swallow it
        raise InvalidInputError(f"inverse transform of the model outputs raised {type(e).__name__}: {e}") from e
    if mapped.shape != outputs.shape:
        raise InvalidInputError(
            f"inverse transform must return the outputs' shape {outputs.shape} (got {mapped.shape}); "
            "it maps standardized predictions back to target units column by column"
        )
    if not np.isfinite(mapped).all():
        raise InvalidInputError("inverse transform of the model outputs gave NaN or infinite values")
    return mapped.copy()
