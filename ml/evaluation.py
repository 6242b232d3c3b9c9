"""Model evaluation and the paired comparison a promotion gate relies on.

`evaluate` runs a classifier once over a labelled set and returns an `EvalReport`: summary metrics
(quality, calibration, CPU latency, size), per-class precision/recall/F1, the confusion matrix and
the per-example evidence (labels, predictions, probabilities). `compare` takes two reports computed
on the same data and returns, per metric, the difference candidate - champion with a paired
bootstrap confidence interval.

Design:

- Every quality metric is a function of the per-example evidence only, and `evaluate` computes its
  numbers with the same vectorised code `compare` resamples (the full data is the identity
  resample). A report's `metrics["accuracy"]` and a comparison's `candidate` are therefore the
  same number, never two implementations that drift apart.
- The bootstrap is paired: each round draws one set of example indices and applies it to both
  models, so the interval reflects the uncertainty of the *difference* on this data (errors the two
  models share cancel), which is far tighter and more honest than two independent intervals.
  Reports from different data (length, label vector or a sha256 fingerprint of the features) are
  refused outright: a gate must never compare such numbers.
- Resamples are processed as an index matrix in chunks; accuracy, log-loss and ECE are means or
  binned sums of per-example quantities, and macro-F1 uses per-row `np.bincount` counts, so 1000
  resamples cost a few numpy passes rather than a Python loop over rounds or examples.
- Macro-F1 averages over the classes that occur in the true labels. Classes absent from the labels
  would add a constant 0 and cap the score (a 10-class model evaluated on a 9-class slice could
  never exceed 0.9); averaging over classes the *predictions* contain (scikit-learn's default)
  would let two models be scored over different class sets. Both would make numbers incomparable.
- Latency is wall-clock CPU time of the forward pass only (`latency_p50_ms`/`latency_p99_ms`
  without a suffix are the batch-1 figures: what one request costs), with the process's thread settings left
  as they are, so it reflects how the model will be served here; GC is paused while timing.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import io
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from domain.errors import InvalidInputError

__all__ = [
    "BUILTIN_METRICS",
    "ECE_BINS",
    "EvalReport",
    "MetricComparison",
    "compare",
    "evaluate",
]

CustomMetric = Callable[[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]], Any]

ECE_BINS = 15
# Whether a larger value is better, for the metrics `compare` can resample from per-example evidence.
BUILTIN_METRICS: dict[str, bool] = {"accuracy": True, "macro_f1": True, "log_loss": False, "ece": False}
# Probabilities are stored as float32, so clip at float32's eps (as scikit-learn does for float32
# input): a confidently wrong prediction costs ~15.9 nats instead of infinity.
_PROB_EPS = float(np.finfo(np.float32).eps)
_ECE_INNER_EDGES = np.linspace(0.0, 1.0, ECE_BINS + 1)[1:-1]
_MIN_RESAMPLES = 1000
# Upper bound on index-matrix entries per bootstrap chunk (~16 MiB of int64), which keeps memory flat
# for large evaluation sets while still amortising numpy call overhead.
_CHUNK_ELEMENTS = 1 << 21
_WARMUP_ITERATIONS = 10
_MIN_LATENCY_REPS = 50
_MAX_LATENCY_REPS = 20_000
_LATENCY_BATCH_SIZES = (1, 32)


@dataclass(frozen=True, eq=False)
class EvalReport:
    """What one evaluation found, with the per-example evidence `compare` resamples.

    The arrays are copied and made read-only on construction, so a report cannot change after a
    gate has looked at it. `eq=False` because element-wise array equality has no single truth value.
    """

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    labels: npt.NDArray[np.int64]
    predictions: npt.NDArray[np.int64]
    probabilities: npt.NDArray[np.float32] = field(repr=False)
    # sha256 of the evaluated features and labels; None for reports built by hand.
    data_fingerprint: str | None = None

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64)
        predictions = np.array(self.predictions, dtype=np.int64)
        probabilities = np.array(self.probabilities, dtype=np.float32)
        if labels.ndim != 1 or labels.size == 0:
            raise InvalidInputError(f"EvalReport.labels must be a non-empty 1-D array (got shape {labels.shape})")
        if predictions.shape != labels.shape:
            raise InvalidInputError(
                f"EvalReport.predictions must have the labels' shape {labels.shape} (got {predictions.shape})"
            )
        if probabilities.ndim != 2 or probabilities.shape[0] != labels.size or probabilities.shape[1] < 2:
            raise InvalidInputError(
                f"EvalReport.probabilities must have shape ({labels.size}, num_classes >= 2) "
                f"(got {probabilities.shape})"
            )
        num_classes = probabilities.shape[1]
        for name, values in (("labels", labels), ("predictions", predictions)):
            if values.min() < 0 or values.max() >= num_classes:
                raise InvalidInputError(f"EvalReport.{name} must lie in [0, {num_classes})")
        for name, array in (("labels", labels), ("predictions", predictions), ("probabilities", probabilities)):
            array.setflags(write=False)
            object.__setattr__(self, name, array)

    @property
    def n_examples(self) -> int:
        return int(self.labels.size)

    @property
    def num_classes(self) -> int:
        return int(self.probabilities.shape[1])

    @property
    def correct(self) -> npt.NDArray[np.bool_]:
        return np.equal(self.predictions, self.labels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary, without the per-example arrays (those can be millions of numbers)."""
        return {
            "n_examples": self.n_examples,
            "num_classes": self.num_classes,
            "data_fingerprint": self.data_fingerprint,
            "metrics": {name: float(value) for name, value in self.metrics.items()},
            "per_class": {cls: {k: float(v) for k, v in stats.items()} for cls, stats in self.per_class.items()},
            "confusion_matrix": [[int(count) for count in row] for row in self.confusion_matrix],
        }


@dataclass(frozen=True)
class MetricComparison:
    """Candidate vs champion on one metric: full-data values and a paired bootstrap interval.

    `difference`, `ci_low` and `ci_high` are candidate - champion. Whether a positive difference is
    an improvement depends on `higher_is_better` (False for log_loss and ece).
    """

    metric: str
    candidate: float
    champion: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int
    n_examples: int
    higher_is_better: bool
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- evaluate


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
    """
    _check_evaluate_arguments(num_classes, batch_size, latency_budget_s)
    label_array = _checked_labels(features, labels, num_classes)
    _check_on_cpu(model)
    resolved = _resolve_custom_metrics(custom_metrics)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            probabilities = _predict_probabilities(model, features, num_classes, batch_size)
            latency = _measure_latency(model, features, latency_budget_s) if measure_latency else {}
    finally:
        model.train(was_training)

    # Argmax of the stored probabilities (not the logits) keeps the evidence self-consistent:
    # a prediction is always the class whose stored probability is the confidence used by ECE.
    predictions = probabilities.argmax(axis=1).astype(np.int64)
    evidence = _Evidence.build(label_array, predictions, probabilities)
    identity = np.arange(label_array.size)[None, :]
    confusion = np.bincount(label_array * num_classes + predictions, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )

    metrics: dict[str, float] = {name: float(_RESAMPLED[name](evidence, identity)[0]) for name in BUILTIN_METRICS}
    metrics.update(latency)
    metrics["size_bytes"] = float(_state_dict_size(model))
    metrics["parameter_count"] = float(_parameter_count(model))
    for path, (name, fn) in resolved.items():
        metrics[name] = _call_custom_metric(path, fn, label_array, predictions, probabilities)

    return EvalReport(
        metrics=metrics,
        per_class=_per_class(confusion),
        confusion_matrix=confusion.tolist(),
        labels=label_array,
        predictions=predictions,
        probabilities=probabilities,
        # A caller that feeds each model its own preprocessing of the same raw rows (the champion
        # keeps the standardizer it was trained with) vouches for "same data" with the raw rows' id.
        data_fingerprint=data_fingerprint or _fingerprint(features, label_array),
    )


def _fingerprint(features: torch.Tensor, labels: npt.NDArray[np.int64]) -> str:
    # Labels alone cannot tell two evaluation sets apart when they share a label vector (e.g. the
    # same split with re-processed features); the gate must refuse those too.
    digest = hashlib.sha256()
    array = features.detach().cpu().contiguous().numpy()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    digest.update(labels.tobytes())
    return digest.hexdigest()


def _check_evaluate_arguments(num_classes: int, batch_size: int, latency_budget_s: float) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidInputError(f"num_classes must be an integer >= 2 (got {num_classes!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer (got {batch_size!r})")
    if not (math.isfinite(latency_budget_s) and latency_budget_s >= 0):
        raise InvalidInputError(f"latency_budget_s must be a finite number >= 0 (got {latency_budget_s!r})")


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


def _check_on_cpu(model: nn.Module) -> None:
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


def _measure_latency(model: nn.Module, features: torch.Tensor, budget_s: float) -> dict[str, float]:
    features = features.detach().cpu()
    # Real rows, tiled when there are fewer than 32: data-dependent paths (embeddings, masks) see
    # realistic inputs, unlike zeros or random tensors.
    tiled = features[torch.arange(max(_LATENCY_BATCH_SIZES)) % features.shape[0]]
    budget_ns = int(budget_s * 1e9 / len(_LATENCY_BATCH_SIZES))
    result: dict[str, float] = {}
    for size in _LATENCY_BATCH_SIZES:
        times_ms = _time_forward(model, tiled[:size].contiguous(), budget_ns)
        result[f"latency_p50_ms_b{size}"] = float(np.percentile(times_ms, 50))
        result[f"latency_p99_ms_b{size}"] = float(np.percentile(times_ms, 99))
    # The unsuffixed names (CONTRACT's `latency_p99_ms` gate) mean one request: batch 1.
    result["latency_p50_ms"] = result["latency_p50_ms_b1"]
    result["latency_p99_ms"] = result["latency_p99_ms_b1"]
    return result


def _time_forward(model: nn.Module, batch: torch.Tensor, budget_ns: int) -> npt.NDArray[np.float64]:
    deadline = time.perf_counter_ns() + budget_ns
    gc_was_enabled = gc.isenabled()
    # A collection landing inside one timed call would show up as a fake p99 spike.
    gc.disable()
    try:
        for _ in range(_WARMUP_ITERATIONS):
            model(batch)
        times: list[int] = []
        while len(times) < _MIN_LATENCY_REPS or (len(times) < _MAX_LATENCY_REPS and time.perf_counter_ns() < deadline):
            start = time.perf_counter_ns()
            model(batch)
            times.append(time.perf_counter_ns() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return np.asarray(times, dtype=np.float64) / 1e6


def _state_dict_size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def _parameter_count(model: nn.Module) -> int:
    """Parameters, including the packed weights of quantized modules.

    `quantize_dynamic` moves Linear weights into packed params that `model.parameters()` no longer
    lists; counting only `parameters()` would report ~0 for a quantized model and make it look
    incomparable with its float original.
    """
    # Keyed by id but holding the tensors: getters return fresh tensors, and an id is only unique
    # while its object is alive.
    seen: dict[int, torch.Tensor] = {}
    total = 0
    for parameter in model.parameters():
        seen[id(parameter)] = parameter
        total += parameter.numel()
    for module in model.modules():
        for attribute in ("weight", "bias"):
            getter = getattr(module, attribute, None)
            if getter is None or isinstance(getter, torch.Tensor) or not callable(getter):
                continue
            try:
                value = getter()
            except (RuntimeError, TypeError):
                continue
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen[id(value)] = value
                total += value.numel()
    return total


def _per_class(confusion: npt.NDArray[np.int64]) -> dict[str, dict[str, float]]:
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * tp, support + predicted)
    return {
        str(cls): {
            "precision": float(precision[cls]),
            "recall": float(recall[cls]),
            "f1": float(f1[cls]),
            "support": float(support[cls]),
        }
        for cls in range(confusion.shape[0])
    }


def _safe_divide(numerator: npt.NDArray[np.float64], denominator: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """numerator / denominator with 0.0 where the denominator is 0 (a class never seen or never predicted)."""
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


# ---------------------------------------------------------------- custom metrics


def _resolve_custom_metrics(paths: Sequence[str]) -> dict[str, tuple[str, CustomMetric]]:
    if isinstance(paths, str):
        raise InvalidInputError(f"custom_metrics must be a list of import paths, not the string {paths!r}")
    resolved: dict[str, tuple[str, CustomMetric]] = {}
    names: dict[str, str] = {}
    for path in paths:
        name, fn = _resolve_custom_metric(path)
        if name in BUILTIN_METRICS or name.startswith(("latency_", "size_bytes", "parameter_count")):
            raise InvalidInputError(f"custom metric {path!r}: the name {name!r} is taken by a built-in metric")
        if name in names and names[name] != path:
            raise InvalidInputError(f"custom metrics {names[name]!r} and {path!r} would both be stored as {name!r}")
        names[name] = path
        resolved[path] = (name, fn)
    return resolved


def _resolve_custom_metric(path: str) -> tuple[str, CustomMetric]:
    module_name, sep, attribute = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not sep or not module_name or not attribute:
        raise InvalidInputError(f"custom metric {path!r}: use an import path of the form 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidInputError(f"custom metric {path!r}: cannot import module {module_name!r} ({e})") from e
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise InvalidInputError(f"custom metric {path!r}: {module_name} has no attribute {attribute!r}")
    if not callable(target):
        raise InvalidInputError(f"custom metric {path!r}: {attribute!r} is not callable; it must be a function")
    return attribute.rsplit(".", 1)[-1], target


def _call_custom_metric(
    path: str,
    fn: CustomMetric,
    labels: npt.NDArray[np.int64],
    predictions: npt.NDArray[np.int64],
    probabilities: npt.NDArray[np.float32],
) -> float:
    try:
        value = fn(labels, predictions, probabilities)
    except Exception as e:  # user code: any failure is reported against its path, never swallowed
        raise InvalidInputError(f"custom metric {path!r} raised {type(e).__name__}: {e}") from e
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidInputError(f"custom metric {path!r} must return a finite float (got {value!r})")
    return float(value)


# ---------------------------------------------------------------- resampled statistics


@dataclass(frozen=True)
class _Evidence:
    """Per-example quantities every built-in metric is a sum or count of."""

    labels: npt.NDArray[np.int64]
    predictions: npt.NDArray[np.int64]
    correct: npt.NDArray[np.float64]
    nll: npt.NDArray[np.float64]
    ece_bin: npt.NDArray[np.int64]
    # correct - confidence: a bin's contribution to ECE is |sum of this over the bin| / N.
    calibration_gap: npt.NDArray[np.float64]
    num_classes: int

    @classmethod
    def build(
        cls, labels: npt.NDArray[np.int64], predictions: npt.NDArray[np.int64], probabilities: npt.NDArray[np.float32]
    ) -> _Evidence:
        rows = np.arange(labels.size)
        true_probability = np.clip(probabilities[rows, labels], _PROB_EPS, 1 - _PROB_EPS).astype(np.float64)
        confidence = probabilities[rows, predictions].astype(np.float64)
        correct = (predictions == labels).astype(np.float64)
        # Bins are (k/15, (k+1)/15]; searchsorted over the inner edges with side="left" gives exactly that.
        ece_bin = np.searchsorted(_ECE_INNER_EDGES, confidence, side="left").astype(np.int64)
        return cls(
            labels=labels,
            predictions=predictions,
            correct=correct,
            nll=-np.log(true_probability),
            ece_bin=ece_bin,
            calibration_gap=correct - confidence,
            num_classes=probabilities.shape[1],
        )

    @classmethod
    def of(cls, report: EvalReport) -> _Evidence:
        return cls.build(report.labels, report.predictions, report.probabilities)


# Each takes an index matrix of shape (rounds, N) and returns the metric for every round.


def _resampled_accuracy(evidence: _Evidence, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    return evidence.correct[idx].mean(axis=1)  # type: ignore[no-any-return]


def _resampled_log_loss(evidence: _Evidence, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    return evidence.nll[idx].mean(axis=1)  # type: ignore[no-any-return]


def _resampled_ece(evidence: _Evidence, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    rounds, n = idx.shape
    keys = (np.arange(rounds)[:, None] * ECE_BINS + evidence.ece_bin[idx]).ravel()
    sums = np.bincount(keys, weights=evidence.calibration_gap[idx].ravel(), minlength=rounds * ECE_BINS)
    return np.abs(sums.reshape(rounds, ECE_BINS)).sum(axis=1) / n  # type: ignore[no-any-return]


def _resampled_macro_f1(evidence: _Evidence, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    # F1 needs only tp, support (row sums) and predicted counts (column sums) of each round's confusion
    # matrix, so three bincounts over round*C + class give them in O(rounds·C) memory instead of the
    # O(rounds·C²) of a full per-round confusion tensor; the numbers are identical.
    rounds, _ = idx.shape
    c = evidence.num_classes
    offsets = np.arange(rounds)[:, None] * c
    true_keys = offsets + evidence.labels[idx]
    hit = evidence.correct[idx] > 0
    size = rounds * c
    support = np.bincount(true_keys.ravel(), minlength=size).reshape(rounds, c)
    predicted = np.bincount((offsets + evidence.predictions[idx]).ravel(), minlength=size).reshape(rounds, c)
    tp = np.bincount(true_keys[hit], minlength=size).reshape(rounds, c)
    f1 = _safe_divide((2 * tp).astype(np.float64), support + predicted)
    present = support > 0
    return (f1 * present).sum(axis=1) / present.sum(axis=1)  # type: ignore[no-any-return]


_RESAMPLED: dict[str, Callable[[_Evidence, npt.NDArray[np.int64]], npt.NDArray[np.float64]]] = {
    "accuracy": _resampled_accuracy,
    "macro_f1": _resampled_macro_f1,
    "log_loss": _resampled_log_loss,
    "ece": _resampled_ece,
}


# ---------------------------------------------------------------- compare


def compare(
    candidate: EvalReport,
    champion: EvalReport,
    *,
    metrics: Sequence[str] = ("accuracy", "macro_f1", "log_loss", "ece"),
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, MetricComparison]:
    """Paired bootstrap of candidate - champion for each metric, keyed by the metric as requested.

    `metrics` holds built-in names (accuracy, macro_f1, log_loss, ece) and/or custom metric import
    paths `"package.module:function"`; a custom function may set `higher_is_better = False` on
    itself (default True). The interval is the percentile interval at `confidence` over
    `n_resamples` rounds that each apply the same example indices to both reports.
    """
    if not isinstance(candidate, EvalReport) or not isinstance(champion, EvalReport):
        raise InvalidInputError("compare needs two EvalReport objects from evaluate()")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < _MIN_RESAMPLES:
        raise InvalidInputError(
            f"n_resamples must be an integer >= {_MIN_RESAMPLES} (got {n_resamples!r}); "
            "fewer rounds make the interval's tails unreliable"
        )
    if not (isinstance(confidence, float | int) and 0 < confidence < 1):
        raise InvalidInputError(f"confidence must be strictly between 0 and 1, e.g. 0.95 (got {confidence!r})")
    if isinstance(metrics, str) or not metrics:
        raise InvalidInputError(f"metrics must be a non-empty list of metric names (got {metrics!r})")
    _check_same_data(candidate, champion)
    custom = {m: _resolve_custom_metric(m)[1] for m in metrics if m not in BUILTIN_METRICS and ":" in m}
    unknown = [m for m in metrics if m not in BUILTIN_METRICS and m not in custom]
    if unknown:
        raise InvalidInputError(
            f"unknown metric(s) {unknown} for compare; allowed: {', '.join(BUILTIN_METRICS)} "
            "or a custom metric import path 'package.module:function'"
        )

    cand_evidence, champ_evidence = _Evidence.of(candidate), _Evidence.of(champion)
    n = candidate.n_examples
    identity = np.arange(n)[None, :]
    differences: dict[str, list[npt.NDArray[np.float64]]] = {m: [] for m in metrics}
    full: dict[str, tuple[float, float]] = {}
    for m in metrics:
        if m in custom:
            full[m] = (
                _custom_on(candidate, m, custom[m], identity)[0],
                _custom_on(champion, m, custom[m], identity)[0],
            )
        else:
            full[m] = (
                float(_RESAMPLED[m](cand_evidence, identity)[0]),
                float(_RESAMPLED[m](champ_evidence, identity)[0]),
            )

    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // max(n, candidate.num_classes)))
    done = 0
    while done < n_resamples:
        rounds = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(rounds, n), dtype=np.int64)
        for m in metrics:
            if m in custom:
                diff = _custom_on(candidate, m, custom[m], idx) - _custom_on(champion, m, custom[m], idx)
            else:
                diff = _RESAMPLED[m](cand_evidence, idx) - _RESAMPLED[m](champ_evidence, idx)
            differences[m].append(diff)
        done += rounds

    tail = (1.0 - float(confidence)) / 2.0
    result: dict[str, MetricComparison] = {}
    for m in metrics:
        low, high = np.quantile(np.concatenate(differences[m]), [tail, 1.0 - tail])
        cand_value, champ_value = full[m]
        result[m] = MetricComparison(
            metric=m,
            candidate=cand_value,
            champion=champ_value,
            difference=cand_value - champ_value,
            ci_low=float(low),
            ci_high=float(high),
            confidence=float(confidence),
            n_resamples=n_resamples,
            n_examples=n,
            higher_is_better=bool(getattr(custom[m], "higher_is_better", True)) if m in custom else BUILTIN_METRICS[m],
            seed=seed,
        )
    return result


def _check_same_data(candidate: EvalReport, champion: EvalReport) -> None:
    if candidate.n_examples != champion.n_examples:
        raise InvalidInputError(
            f"cannot compare reports from different data: candidate has {candidate.n_examples} examples, "
            f"champion {champion.n_examples}; evaluate both models on the same evaluation set"
        )
    if candidate.num_classes != champion.num_classes:
        raise InvalidInputError(
            f"cannot compare reports with different class counts ({candidate.num_classes} vs {champion.num_classes})"
        )
    if not np.array_equal(candidate.labels, champion.labels):
        mismatches = int((candidate.labels != champion.labels).sum())
        raise InvalidInputError(
            f"cannot compare reports from different data: {mismatches} of {candidate.n_examples} labels differ "
            "(another split, or the same rows in another order); evaluate both models on the same evaluation set"
        )
    ours, theirs = candidate.data_fingerprint, champion.data_fingerprint
    if ours is not None and theirs is not None and ours != theirs:
        raise InvalidInputError(
            "cannot compare reports from different data: the evaluated features differ "
            f"(fingerprints {ours[:12]}... vs {theirs[:12]}...); "
            "evaluate both models on the same evaluation set"
        )


def _custom_on(report: EvalReport, path: str, fn: CustomMetric, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    # Arbitrary user code cannot be vectorised across rounds, so this is the one per-round loop.
    return np.array(
        [
            _call_custom_metric(path, fn, report.labels[row], report.predictions[row], report.probabilities[row])
            for row in idx
        ],
        dtype=np.float64,
    )
