"""`compare`: candidate - champion per metric, with a paired bootstrap confidence interval.

The bootstrap is paired: each round draws one set of example indices and applies it to both models,
so the interval reflects the uncertainty of the *difference* on this data (errors the two models
share cancel), which is far tighter and more honest than two independent intervals. Reports from
different data (length, label or target vector, or a sha256 fingerprint of the features) are
refused outright, and so is a regression report against a classification report: a gate must
never compare such numbers. Resamples are processed as an index matrix in chunks, so memory stays
flat whatever `n_resamples` is; the full data is the identity resample, so a comparison's
`candidate` is the report's own metric value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from domain.errors import InvalidInputError
from ml.evaluation.custom_metrics import CustomMetric, call_custom_metric, resolve_custom_metric
from ml.evaluation.regression_metrics import (
    REGRESSION_METRICS,
    RegressionEvidence,
    require_defined,
    resample_regression,
)
from ml.evaluation.report import EvalReport, MetricComparison, RegressionReport
from ml.evaluation.resampling import BUILTIN_METRICS, Evidence, resample

Report = EvalReport | RegressionReport
# The built-in metrics of a report's task for an index matrix (rounds, N): name -> value per round.
Resampler = Callable[[npt.NDArray[np.int64], Sequence[str]], dict[str, npt.NDArray[np.float64]]]

_MIN_RESAMPLES = 1000
# Upper bound on index-matrix entries per bootstrap chunk (~16 MiB of int64), which keeps memory flat
# for large evaluation sets while still amortising numpy call overhead.
_CHUNK_ELEMENTS = 1 << 21
_CLASSIFICATION_DEFAULT = ("accuracy", "macro_f1", "log_loss", "ece", "roc_auc", "pr_auc")


def compare(
    candidate: Report,
    champion: Report,
    *,
    metrics: Sequence[str] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, MetricComparison]:
    """Paired bootstrap of candidate - champion for each metric, keyed by the metric as requested.

    Both reports come from `evaluate` (classification) or both from `evaluate_regression`.
    `metrics` holds built-in names of that task and/or custom metric import paths
    `"package.module:function"`; a custom function may set `higher_is_better = False` on itself
    (default True), which the result's `higher_is_better` carries to the gate. None means the
    task's defaults: accuracy, macro_f1, log_loss, ece, roc_auc, pr_auc for classification;
    rmse, mae, r2 and, unless a target is 0, mape for regression. mape asked for by name on
    targets with a 0 is refused (InvalidInputError naming the rows; use mae or rmse).

    The interval is the percentile interval at `confidence` over `n_resamples` rounds that each
    apply the same example indices to both reports. A metric undefined in some rounds (roc_auc
    and pr_auc on labels of one class, r2 on equal targets) has those rounds counted in
    `undefined_resamples` and left out; the interval is NaN when the full set is undefined or
    when those rounds outnumber one tail of the interval.
    """
    if not isinstance(candidate, EvalReport | RegressionReport) or not isinstance(
        champion, EvalReport | RegressionReport
    ):
        raise InvalidInputError("compare needs two reports, from evaluate() or from evaluate_regression()")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < _MIN_RESAMPLES:
        raise InvalidInputError(
            f"n_resamples must be an integer >= {_MIN_RESAMPLES} (got {n_resamples!r}); "
            "fewer rounds make the interval's tails unreliable"
        )
    if not (isinstance(confidence, float | int) and 0 < confidence < 1):
        raise InvalidInputError(f"confidence must be strictly between 0 and 1, e.g. 0.95 (got {confidence!r})")
    _check_same_data(candidate, champion)
    regression = isinstance(candidate, RegressionReport)
    builtins = REGRESSION_METRICS if regression else BUILTIN_METRICS
    if metrics is None:
        metrics = _default_metrics(candidate)
    if isinstance(metrics, str) or not metrics:
        raise InvalidInputError(f"metrics must be a non-empty list of metric names (got {metrics!r})")
    custom = {m: resolve_custom_metric(m)[1] for m in metrics if m not in builtins and ":" in m}
    unknown = [m for m in metrics if m not in builtins and m not in custom]
    if unknown:
        raise InvalidInputError(
            f"unknown metric(s) {unknown} for compare on {candidate.task} reports; allowed: "
            f"{', '.join(builtins)} or a custom metric import path 'package.module:function'"
        )

    reports = (candidate, champion)
    resamplers = (_resampler(candidate), _resampler(champion))
    builtin = [m for m in metrics if m not in custom]
    n = candidate.n_examples
    full = {
        m: (float(ours[0]), float(theirs[0]))
        for m, (ours, theirs) in _on_both(reports, resamplers, builtin, custom, np.arange(n)[None, :]).items()
    }

    differences: dict[str, list[npt.NDArray[np.float64]]] = {m: [] for m in metrics}
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // _row_width(candidate)))
    done = 0
    while done < n_resamples:
        rounds = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(rounds, n), dtype=np.int64)
        for m, (ours, theirs) in _on_both(reports, resamplers, builtin, custom, idx).items():
            differences[m].append(ours - theirs)
        done += rounds

    tail = (1.0 - float(confidence)) / 2.0
    result: dict[str, MetricComparison] = {}
    for m in metrics:
        cand_value, champ_value = full[m]
        low, high, undefined = _percentile_interval(np.concatenate(differences[m]), tail)
        if not (math.isfinite(cand_value) and math.isfinite(champ_value)):
            low = high = math.nan
        result[m] = MetricComparison(
            metric=m,
            candidate=cand_value,
            champion=champ_value,
            difference=cand_value - champ_value,
            ci_low=low,
            ci_high=high,
            confidence=float(confidence),
            n_resamples=n_resamples,
            n_examples=n,
            higher_is_better=bool(getattr(custom[m], "higher_is_better", True)) if m in custom else builtins[m],
            seed=seed,
            undefined_resamples=undefined,
        )
    return result


def _default_metrics(report: Report) -> tuple[str, ...]:
    if isinstance(report, EvalReport):
        return _CLASSIFICATION_DEFAULT
    # A default list must not fail a run on data with a 0 target: mape is left out there, and only
    # refused when asked for by name.
    return tuple(m for m in REGRESSION_METRICS if m != "mape" or "mape" not in report.undefined_metrics)


def _resampler(report: Report) -> Resampler:
    if isinstance(report, RegressionReport):
        regression = RegressionEvidence.of(report)

        def regression_metrics(idx: npt.NDArray[np.int64], names: Sequence[str]) -> dict[str, npt.NDArray[np.float64]]:
            require_defined(regression, names)
            return resample_regression(regression, idx, names)

        return regression_metrics
    evidence = Evidence.of(report)
    return lambda idx, names: resample(evidence, idx, names)


def _row_width(report: Report) -> int:
    """Entries per resampled example in the largest array a round gathers (bounds the chunk)."""
    if isinstance(report, RegressionReport):
        return report.n_examples * report.n_outputs
    return max(report.n_examples, report.num_classes)


def _on_both(
    reports: tuple[Report, Report],
    resamplers: tuple[Resampler, Resampler],
    builtin: Sequence[str],
    custom: dict[str, CustomMetric],
    idx: npt.NDArray[np.int64],
) -> dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
    """Every metric on both models for the same index matrix: (candidate's rounds, champion's rounds)."""
    ours, theirs = (resampler(idx, builtin) for resampler in resamplers)
    values = {m: (ours[m], theirs[m]) for m in builtin}
    for m, fn in custom.items():
        values[m] = (_custom_on(reports[0], m, fn, idx), _custom_on(reports[1], m, fn, idx))
    return values


def _percentile_interval(differences: npt.NDArray[np.float64], tail: float) -> tuple[float, float, int]:
    """(low, high, rounds where the metric was undefined). A ranking metric is undefined in a round
    whose labels hold one class; those rounds are left out, unless they outnumber one tail of the
    interval: they could then be that whole tail, and the interval is NaN (the gate fails closed)."""
    defined = differences[np.isfinite(differences)]
    undefined = differences.size - defined.size
    if defined.size == 0 or undefined > tail * differences.size:
        return math.nan, math.nan, undefined
    low, high = np.quantile(defined, [tail, 1.0 - tail])
    return float(low), float(high), undefined


def _check_same_data(candidate: Report, champion: Report) -> None:
    if type(candidate) is not type(champion):
        raise InvalidInputError(
            f"cannot compare a {candidate.task} report with a {champion.task} report; "
            "evaluate both models with the pipeline's task"
        )
    if candidate.n_examples != champion.n_examples:
        raise InvalidInputError(
            f"cannot compare reports from different data: candidate has {candidate.n_examples} examples, "
            f"champion {champion.n_examples}; evaluate both models on the same evaluation set"
        )
    if isinstance(candidate, RegressionReport) and isinstance(champion, RegressionReport):
        _check_same_values("targets", candidate.targets, champion.targets, "output counts")
    elif isinstance(candidate, EvalReport) and isinstance(champion, EvalReport):
        if candidate.num_classes != champion.num_classes:
            raise InvalidInputError(
                "cannot compare reports with different class counts "
                f"({candidate.num_classes} vs {champion.num_classes})"
            )
        _check_same_values("labels", candidate.labels, champion.labels, "label shapes")
    ours, theirs = candidate.data_fingerprint, champion.data_fingerprint
    if ours is not None and theirs is not None and ours != theirs:
        raise InvalidInputError(
            "cannot compare reports from different data: the evaluated features differ "
            f"(fingerprints {ours[:12]}... vs {theirs[:12]}...); "
            "evaluate both models on the same evaluation set"
        )


def _check_same_values(name: str, ours: npt.NDArray[np.generic], theirs: npt.NDArray[np.generic], what: str) -> None:
    if ours.shape != theirs.shape:
        raise InvalidInputError(f"cannot compare reports with different {what} ({ours.shape} vs {theirs.shape})")
    if not np.array_equal(ours, theirs):
        mismatches = int(np.any((ours != theirs).reshape(ours.shape[0], -1), axis=1).sum())
        raise InvalidInputError(
            f"cannot compare reports from different data: {mismatches} of {ours.shape[0]} {name} differ "
            "(another split, or the same rows in another order); evaluate both models on the same evaluation set"
        )


def _custom_on(report: Report, path: str, fn: CustomMetric, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    # Arbitrary user code cannot be vectorised across rounds, so this is the one per-round loop.
    arrays: tuple[npt.NDArray[np.generic], ...] = (
        (report.targets, report.predictions)
        if isinstance(report, RegressionReport)
        else (report.labels, report.predictions, report.probabilities)
    )
    return np.array([call_custom_metric(path, fn, *(a[row] for a in arrays)) for row in idx], dtype=np.float64)


def disagreement(candidate: Report, champion: Report, bin_edges: Sequence[float] = ()) -> float:
    """How often the two models' predictions land in different categories on the same rows (0: never).

    Categories are the predicted classes of two classifiers, or for two regression models the bins
    cut by `bin_edges` (the champion's prediction quantiles, first output). The canary's drift check
    reads it: on the same inputs, the two models' category distributions differ (in total variation)
    by at most this rate, so live drift within it is what the gate already accepted, not a fault."""
    if type(candidate) is not type(champion):
        raise InvalidInputError("disagreement compares two reports of one task (two classifiers or two regressions)")
    _check_same_data(candidate, champion)
    if isinstance(candidate, RegressionReport) and isinstance(champion, RegressionReport):
        edges = np.asarray(bin_edges, dtype=np.float64)
        ours = np.searchsorted(edges, candidate.predictions[:, 0], side="right")
        theirs = np.searchsorted(edges, champion.predictions[:, 0], side="right")
        return float(np.mean(ours != theirs))
    return float(np.mean(candidate.predictions != champion.predictions))
