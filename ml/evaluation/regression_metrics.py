"""The built-in regression metrics as vectorised functions of per-example evidence.

`resample_regression` takes an index matrix of shape (rounds, N) and returns each named metric for
every round; `evaluate_regression` calls it with the identity resample and `compare` with bootstrap
draws, so both report the same number for the same data (the same design as resampling.py).

Every metric is computed per output column and then macro-averaged (the unweighted mean over
outputs, scikit-learn's `multioutput="uniform_average"`), so a multi-output model is judged on each
target equally whatever its scale:

- `rmse`: mean over outputs of sqrt(mean squared error);
- `mae`: mean over outputs of mean |error|;
- `r2`: mean over outputs of 1 - SS_res / SS_tot; undefined (NaN) when an output's targets are all
  equal, in the data or in a bootstrap round (scikit-learn would report 0 or 1 there, a made-up number);
- `mape`: mean over outputs of mean |error| / |target|, a fraction (0.05 is 5 %) like scikit-learn's;
  undefined when a target is 0, where scikit-learn would divide by its float64 epsilon and report
  a number in the trillions. A report then holds NaN with the reason, and `compare` refuses mape
  (`require_defined`) with the row count and the fix: judge such a target by mae or rmse.

Memory is a few arrays of (rounds, N, outputs) float64, which the caller bounds by chunking rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from domain.errors import InvalidInputError
from domain.task import QUALITY_METRICS
from ml.evaluation.report import RegressionReport

# Whether a larger value is better, for the regression metrics `compare` can resample (domain/task.py).
REGRESSION_METRICS: dict[str, bool] = QUALITY_METRICS["regression"]


@dataclass(frozen=True)
class RegressionEvidence:
    """Per-example quantities every regression metric is a mean or sum of, each [N, outputs]."""

    targets: npt.NDArray[np.float64]
    squared_error: npt.NDArray[np.float64]
    absolute_error: npt.NDArray[np.float64]
    # |error| / |target|; None when a target is 0 (mape undefined on this data).
    relative_error: npt.NDArray[np.float64] | None
    # rows with a target of 0 in at least one output
    zero_target_rows: int

    @classmethod
    def build(cls, targets: npt.NDArray[np.float64], predictions: npt.NDArray[np.float64]) -> RegressionEvidence:
        error = predictions - targets
        absolute = np.abs(error)
        zero_rows = int(np.any(targets == 0, axis=1).sum())
        return cls(
            targets=targets,
            squared_error=error * error,
            absolute_error=absolute,
            relative_error=None if zero_rows else absolute / np.abs(targets),
            zero_target_rows=zero_rows,
        )

    @classmethod
    def of(cls, report: RegressionReport) -> RegressionEvidence:
        return cls.build(report.targets, report.predictions)

    def undefined_reasons(self) -> dict[str, str]:
        """Why a metric is NaN on the full data, by metric (empty when every metric is defined)."""
        reasons: dict[str, str] = {}
        if self.relative_error is None:
            reasons["mape"] = _mape_reason(self.zero_target_rows, self.targets.shape[0])
        constant = np.flatnonzero(self.targets.max(axis=0) == self.targets.min(axis=0))
        if constant.size:
            reasons["r2"] = (
                f"r2 is undefined: the targets of output(s) {constant.tolist()} are all equal (no variance to explain)"
            )
        return reasons


def require_defined(evidence: RegressionEvidence, names: Sequence[str]) -> None:
    """Refuses mape when a target is 0: asked for by name, it has no honest value to gate on."""
    if "mape" in names and evidence.relative_error is None:
        raise InvalidInputError(_mape_reason(evidence.zero_target_rows, evidence.targets.shape[0]))


def resample_regression(
    evidence: RegressionEvidence, idx: npt.NDArray[np.int64], names: Sequence[str]
) -> dict[str, npt.NDArray[np.float64]]:
    """Each named regression metric for every row of the index matrix `idx` (rounds, N), macro over outputs."""
    values: dict[str, npt.NDArray[np.float64]] = {}
    for name in names:
        if name == "rmse":
            values[name] = np.sqrt(evidence.squared_error[idx].mean(axis=1)).mean(axis=1)
        elif name == "mae":
            values[name] = evidence.absolute_error[idx].mean(axis=1).mean(axis=1)
        elif name == "mape":
            relative = evidence.relative_error
            values[name] = (
                np.full(idx.shape[0], np.nan) if relative is None else relative[idx].mean(axis=1).mean(axis=1)
            )
        elif name == "r2":
            values[name] = _resampled_r2(evidence, idx)
    return values


def _resampled_r2(evidence: RegressionEvidence, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    targets = evidence.targets[idx]
    # Two passes (centre, then square) rather than sum(y²) - n·mean²: targets in the thousands with a
    # small spread would lose every significant digit of SS_tot to cancellation.
    centred = targets - targets.mean(axis=1, keepdims=True)
    total = np.einsum("rnk,rnk->rk", centred, centred)
    residual = evidence.squared_error[idx].sum(axis=1)
    # Equal targets are detected exactly (max == min): their centred values can be ±1 ulp, not 0.
    constant = targets.max(axis=1) == targets.min(axis=1)
    r2 = np.full(total.shape, np.nan)
    np.divide(residual, total, out=r2, where=~constant)
    return (1.0 - r2).mean(axis=1)  # type: ignore[no-any-return]


def _mape_reason(zero_rows: int, n: int) -> str:
    return (
        f"mape is undefined on this data: {zero_rows} of {n} rows have a target of 0 "
        "(mape divides by the target); use mae or rmse for this target instead"
    )
