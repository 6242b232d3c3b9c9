"""What an evaluation and a comparison return: `EvalReport`, `RegressionReport` and `MetricComparison`.

A regression evaluation gets its own report type rather than a `task` field on `EvalReport`: the
two hold different evidence (class indices, probabilities and a confusion matrix vs float targets
and predictions of shape [N, outputs]), so one type would carry fields that are meaningless for
half its instances and every reader would branch on the task. Two frozen types keep each one's
invariants checked on construction; `compare` accepts either, but never one of each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from domain.errors import InvalidInputError


@dataclass(frozen=True, eq=False)
class EvalReport:
    """What one evaluation found, with the per-example evidence `compare` resamples.

    The arrays are copied and made read-only on construction, so a report cannot change after a
    gate has looked at it. `eq=False` because element-wise array equality has no single truth value.
    """

    task: ClassVar[str] = "classification"

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
            # An undefined metric (roc_auc on labels of one class) is NaN here and null in JSON.
            "metrics": {name: _finite_or_none(value) for name, value in self.metrics.items()},
            "per_class": {cls: {k: float(v) for k, v in stats.items()} for cls, stats in self.per_class.items()},
            "confusion_matrix": [[int(count) for count in row] for row in self.confusion_matrix],
        }


@dataclass(frozen=True, eq=False)
class RegressionReport:
    """What one regression evaluation found: metrics and the per-example evidence `compare` resamples.

    `targets` and `predictions` are float64 arrays of shape [N, outputs] in the target's own units
    (a 1-D array is taken as one output); they are copied and made read-only on construction.
    `undefined_metrics` maps a metric whose value is NaN on this data to the reason (mape on a
    target of 0, r2 on an output whose targets are all equal).
    """

    task: ClassVar[str] = "regression"

    metrics: dict[str, float]
    targets: npt.NDArray[np.float64] = field(repr=False)
    predictions: npt.NDArray[np.float64] = field(repr=False)
    # sha256 of the evaluated features and targets; None for reports built by hand.
    data_fingerprint: str | None = None
    undefined_metrics: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        targets = _as_outputs("targets", self.targets)
        predictions = _as_outputs("predictions", self.predictions)
        if predictions.shape != targets.shape:
            raise InvalidInputError(
                f"RegressionReport.predictions must have the targets' shape {targets.shape} (got {predictions.shape})"
            )
        for name, array in (("targets", targets), ("predictions", predictions)):
            array.setflags(write=False)
            object.__setattr__(self, name, array)

    @property
    def n_examples(self) -> int:
        """Rows evaluated (N)."""
        return len(self.targets)

    @property
    def n_outputs(self) -> int:
        """Target columns per row: 1 for a single float target."""
        return int(self.targets.shape[-1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary, without the per-example arrays; an undefined (NaN) metric is null."""
        return {
            "task": self.task,
            "n_examples": self.n_examples,
            "n_outputs": self.n_outputs,
            "data_fingerprint": self.data_fingerprint,
            "metrics": {name: _finite_or_none(value) for name, value in self.metrics.items()},
            "undefined_metrics": dict(self.undefined_metrics),
        }


@dataclass(frozen=True)
class MetricComparison:
    """Candidate vs champion on one metric: full-data values and a paired bootstrap interval.

    `difference`, `ci_low` and `ci_high` are candidate - champion. Whether a positive difference is
    an improvement depends on `higher_is_better` (False for log_loss, ece, rmse, mae and mape). `ci_low`/`ci_high`
    are NaN when the metric is undefined on this data (see `compare`).
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
    # bootstrap rounds where the metric was undefined (a ranking metric on labels of one class)
    undefined_resamples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite_or_none(value: float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _as_outputs(name: str, values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    array = np.array(values, dtype=np.float64)
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(
            f"RegressionReport.{name} must be a non-empty array of shape [N, outputs] (got {np.shape(values)})"
        )
    if not np.isfinite(array).all():
        raise InvalidInputError(f"RegressionReport.{name} holds NaN or infinite values; every value must be finite")
    return array
