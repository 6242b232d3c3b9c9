"""`compare`: candidate - champion per metric, with a paired bootstrap confidence interval.

The bootstrap is paired: each round draws one set of example indices and applies it to both models,
so the interval reflects the uncertainty of the *difference* on this data (errors the two models
share cancel), which is far tighter and more honest than two independent intervals. Reports from
different data (length, label vector or a sha256 fingerprint of the features) are refused outright:
a gate must never compare such numbers. Resamples are processed as an index matrix in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from domain.errors import InvalidInputError
from ml.evaluation.custom_metrics import CustomMetric, call_custom_metric, resolve_custom_metric
from ml.evaluation.report import EvalReport, MetricComparison
from ml.evaluation.resampling import BUILTIN_METRICS, Evidence, resample

_MIN_RESAMPLES = 1000
# Upper bound on index-matrix entries per bootstrap chunk (~16 MiB of int64), which keeps memory flat
# for large evaluation sets while still amortising numpy call overhead.
_CHUNK_ELEMENTS = 1 << 21


def compare(
    candidate: EvalReport,
    champion: EvalReport,
    *,
    metrics: Sequence[str] = ("accuracy", "macro_f1", "log_loss", "ece", "roc_auc", "pr_auc"),
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, MetricComparison]:
    """Paired bootstrap of candidate - champion for each metric, keyed by the metric as requested.

    `metrics` holds built-in names (accuracy, macro_f1, log_loss, ece, roc_auc, pr_auc) and/or
    custom metric import paths `"package.module:function"`; a custom function may set
    `higher_is_better = False` on itself (default True), which the result's `higher_is_better`
    carries to the gate. The interval is the percentile interval at `confidence` over
    `n_resamples` rounds that each apply the same example indices to both reports. roc_auc and
    pr_auc are undefined (NaN) on labels of one class: such rounds are counted in
    `undefined_resamples` and left out; the interval is NaN when the full set has one class or
    when those rounds outnumber one tail of the interval.
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
    custom = {m: resolve_custom_metric(m)[1] for m in metrics if m not in BUILTIN_METRICS and ":" in m}
    unknown = [m for m in metrics if m not in BUILTIN_METRICS and m not in custom]
    if unknown:
        raise InvalidInputError(
            f"unknown metric(s) {unknown} for compare; allowed: {', '.join(BUILTIN_METRICS)} "
            "or a custom metric import path 'package.module:function'"
        )

    reports, evidences = (candidate, champion), (Evidence.of(candidate), Evidence.of(champion))
    builtin = [m for m in metrics if m not in custom]
    n = candidate.n_examples
    full = {
        m: (float(ours[0]), float(theirs[0]))
        for m, (ours, theirs) in _on_both(reports, evidences, builtin, custom, np.arange(n)[None, :]).items()
    }

    differences: dict[str, list[npt.NDArray[np.float64]]] = {m: [] for m in metrics}
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // max(n, candidate.num_classes)))
    done = 0
    while done < n_resamples:
        rounds = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(rounds, n), dtype=np.int64)
        for m, (ours, theirs) in _on_both(reports, evidences, builtin, custom, idx).items():
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
            higher_is_better=bool(getattr(custom[m], "higher_is_better", True)) if m in custom else BUILTIN_METRICS[m],
            seed=seed,
            undefined_resamples=undefined,
        )
    return result


def _on_both(
    reports: tuple[EvalReport, EvalReport],
    evidences: tuple[Evidence, Evidence],
    builtin: Sequence[str],
    custom: dict[str, CustomMetric],
    idx: npt.NDArray[np.int64],
) -> dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
    """Every metric on both models for the same index matrix: (candidate's rounds, champion's rounds)."""
    ours, theirs = (resample(evidence, idx, builtin) for evidence in evidences)
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
            call_custom_metric(path, fn, report.labels[row], report.predictions[row], report.probabilities[row])
            for row in idx
        ],
        dtype=np.float64,
    )


def disagreement(candidate: EvalReport, champion: EvalReport) -> float:
    """How often the two models predict different classes on the same rows (0: never, 1: always).

    The canary's drift check reads it: on the same inputs, the predicted-class distributions of two
    models differ (in total variation) by at most this rate, so live drift within it is what the gate
    already accepted, not a fault."""
    _check_same_data(candidate, champion)
    return float(np.mean(candidate.predictions != champion.predictions))
