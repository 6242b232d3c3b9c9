"""The built-in quality metrics as vectorised functions of per-example evidence.

Each `resampled_*` takes an index matrix of shape (rounds, N) and returns the metric for every round;
`evaluate` calls them with the identity resample and `compare` with bootstrap draws, so both report
the same number for the same data. Accuracy, log-loss and ECE are means or binned sums of
per-example quantities, and macro-F1 uses per-row `np.bincount` counts, so 1000 resamples cost a
few numpy passes rather than a Python loop over rounds or examples. The ranking metrics `roc_auc` and
`pr_auc` come from ml/evaluation/ranking.py, computed together from the same per-round counts;
`resample` is the one entry point that returns any set of built-in metrics for an index matrix.

Macro-F1 averages over the classes that occur in the true labels. Classes absent from the labels
would add a constant 0 and cap the score (a 10-class model evaluated on a 9-class slice could never
exceed 0.9); averaging over classes the *predictions* contain (scikit-learn's default) would let two
models be scored over different class sets. Both would make numbers incomparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from domain.task import QUALITY_METRICS
from ml.evaluation.ranking import RANKING_METRICS, RankingEvidence, resampled_ranking
from ml.evaluation.report import EvalReport

ECE_BINS = 15
# Whether a larger value is better, for the metrics `compare` can resample from per-example evidence
# (the classification task's quality metrics: domain/task.py is the one list).
BUILTIN_METRICS: dict[str, bool] = QUALITY_METRICS["classification"]
# Probabilities are stored as float32, so clip at float32's eps (as scikit-learn does for float32
# input): a confidently wrong prediction costs ~15.9 nats instead of infinity.
_PROB_EPS = float(np.finfo(np.float32).eps)
_ECE_INNER_EDGES = np.linspace(0.0, 1.0, ECE_BINS + 1)[1:-1]


@dataclass(frozen=True)
class Evidence:
    """Per-example quantities every built-in metric is a sum or count of."""

    labels: npt.NDArray[np.int64]
    predictions: npt.NDArray[np.int64]
    correct: npt.NDArray[np.float64]
    nll: npt.NDArray[np.float64]
    ece_bin: npt.NDArray[np.int64]
    # correct - confidence: a bin's contribution to ECE is |sum of this over the bin| / N.
    calibration_gap: npt.NDArray[np.float64]
    num_classes: int
    ranking: RankingEvidence

    @classmethod
    def build(
        cls, labels: npt.NDArray[np.int64], predictions: npt.NDArray[np.int64], probabilities: npt.NDArray[np.float32]
    ) -> Evidence:
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
            ranking=RankingEvidence.build(labels, probabilities),
        )

    @classmethod
    def of(cls, report: EvalReport) -> Evidence:
        return cls.build(report.labels, report.predictions, report.probabilities)


def resampled_accuracy(evidence: Evidence, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    return evidence.correct[idx].mean(axis=1)  # type: ignore[no-any-return]


def resampled_log_loss(evidence: Evidence, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    return evidence.nll[idx].mean(axis=1)  # type: ignore[no-any-return]


def resampled_ece(evidence: Evidence, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    rounds, n = idx.shape
    keys = (np.arange(rounds)[:, None] * ECE_BINS + evidence.ece_bin[idx]).ravel()
    sums = np.bincount(keys, weights=evidence.calibration_gap[idx].ravel(), minlength=rounds * ECE_BINS)
    return np.abs(sums.reshape(rounds, ECE_BINS)).sum(axis=1) / n  # type: ignore[no-any-return]


def resampled_macro_f1(evidence: Evidence, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
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
    f1 = safe_divide((2 * tp).astype(np.float64), support + predicted)
    present = support > 0
    return (f1 * present).sum(axis=1) / present.sum(axis=1)  # type: ignore[no-any-return]


RESAMPLED: dict[str, Callable[[Evidence, npt.NDArray[np.int64]], npt.NDArray[np.float64]]] = {
    "accuracy": resampled_accuracy,
    "macro_f1": resampled_macro_f1,
    "log_loss": resampled_log_loss,
    "ece": resampled_ece,
}


def resample(
    evidence: Evidence, idx: npt.NDArray[np.int64], names: Sequence[str]
) -> dict[str, npt.NDArray[np.float64]]:
    """Each named built-in metric for every row of the index matrix `idx` (rounds, N).

    The ranking metrics are computed once for both names; they are NaN in a round whose labels
    hold one class only (ml/evaluation/ranking.py)."""
    values = {name: RESAMPLED[name](evidence, idx) for name in names if name in RESAMPLED}
    if any(name in RANKING_METRICS for name in names):
        ranking = resampled_ranking(evidence.ranking, idx)
        values.update({name: ranking[name] for name in names if name in RANKING_METRICS})
    return values


def safe_divide(numerator: npt.NDArray[np.float64], denominator: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """numerator / denominator with 0.0 where the denominator is 0 (a class never seen or never predicted)."""
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out
