"""What an evaluation and a comparison return: `EvalReport` and `MetricComparison`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from domain.errors import InvalidInputError


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
            # An undefined metric (roc_auc on labels of one class) is NaN here and null in JSON.
            "metrics": {name: _finite_or_none(value) for name, value in self.metrics.items()},
            "per_class": {cls: {k: float(v) for k, v in stats.items()} for cls, stats in self.per_class.items()},
            "confusion_matrix": [[int(count) for count in row] for row in self.confusion_matrix],
        }


@dataclass(frozen=True)
class MetricComparison:
    """Candidate vs champion on one metric: full-data values and a paired bootstrap interval.

    `difference`, `ci_low` and `ci_high` are candidate - champion. Whether a positive difference is
    an improvement depends on `higher_is_better` (False for log_loss and ece). `ci_low`/`ci_high`
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
