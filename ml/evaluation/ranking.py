"""Ranking metrics, `roc_auc` and `pr_auc` (average precision), vectorised over bootstrap resamples.

Which scores are ranked: for a binary classifier, the probability of class 1 (the positive class)
against the label `== 1`; for more classes, each class's probability against "this class vs the
rest", averaged over classes (macro one-vs-rest). A class absent from the labels of a resample
has no positives there, so it is skipped in that resample's macro average rather than counted as
0 or 0.5; a resample (or a whole evaluation set) whose labels hold one class only has no pair to
rank, and the metric is NaN there: undefined, never a silent 0.5.

How a resample is scored without sorting it again: the examples are sorted by score once per
class, and tied scores form one group. A resample is a vector of counts (how often each example
was drawn), so each group's positive and negative counts are sums of those counts; with them,

- ROC AUC is the Mann-Whitney statistic with midranks: sum over groups of
  positives x (negatives in lower groups + half the negatives in the same group), over P x N;
- average precision is scikit-learn's step-wise definition, sum over thresholds of
  recall increment x precision, with tied scores as one threshold: sum over groups of
  positives x (positives at or above / examples at or above), over P.

Both come from the same per-group counts, so they are computed together; memory is a few arrays
of (rounds, N) floats, which the caller bounds by chunking the rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

RANKING_METRICS = ("roc_auc", "pr_auc")


@dataclass(frozen=True)
class _RankedClass:
    """One class's scores sorted ascending: the order, which sorted example is a positive, where
    each run of tied scores starts (None when no two scores tie)."""

    order: npt.NDArray[np.int64]
    positive: npt.NDArray[np.float64]
    group_starts: npt.NDArray[np.int64] | None


@dataclass(frozen=True)
class RankingEvidence:
    """The sorted scores of the classes a ranking metric averages over (class 1 only when binary)."""

    n_examples: int
    classes: tuple[_RankedClass, ...]

    @classmethod
    def build(cls, labels: npt.NDArray[np.int64], probabilities: npt.NDArray[np.float32]) -> RankingEvidence:
        num_classes = probabilities.shape[1]
        ranked = []
        for k in (1,) if num_classes == 2 else range(num_classes):
            scores = probabilities[:, k]
            order = np.argsort(scores, kind="stable").astype(np.int64)
            ordered = scores[order]
            starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1]))).astype(np.int64)
            ranked.append(
                _RankedClass(
                    order=order,
                    positive=(labels[order] == k).astype(np.float64),
                    group_starts=None if starts.size == scores.size else starts,
                )
            )
        return cls(n_examples=int(labels.size), classes=tuple(ranked))


def resampled_ranking(evidence: RankingEvidence, idx: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.float64]]:
    """`roc_auc` and `pr_auc` for every row of the index matrix `idx` (rounds, N); NaN where undefined."""
    rounds = idx.shape[0]
    n = evidence.n_examples
    keys = (np.arange(rounds, dtype=np.int64)[:, None] * n + idx).ravel()
    counts = np.bincount(keys, minlength=rounds * n).reshape(rounds, n).astype(np.float64)
    sums = {name: np.zeros(rounds) for name in RANKING_METRICS}
    defined_classes = np.zeros(rounds)
    for ranked in evidence.classes:
        roc, ap, defined = _one_vs_rest(counts, ranked)
        sums["roc_auc"] += np.where(defined, roc, 0.0)
        sums["pr_auc"] += np.where(defined, ap, 0.0)
        defined_classes += defined
    result = {}
    for name, total in sums.items():
        out = np.full(rounds, np.nan)
        np.divide(total, defined_classes, out=out, where=defined_classes > 0)
        result[name] = out
    return result


def _one_vs_rest(
    counts: npt.NDArray[np.float64], ranked: _RankedClass
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    neg = counts[:, ranked.order]
    pos = neg * ranked.positive
    neg -= pos
    if ranked.group_starts is not None:
        pos = np.add.reduceat(pos, ranked.group_starts, axis=1)
        neg = np.add.reduceat(neg, ranked.group_starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    defined = (n_pos > 0) & (n_neg > 0)
    # Groups are in ascending score order: negatives strictly below each group, then the ROC numerator.
    below = np.cumsum(neg, axis=1)
    below -= neg
    roc_pairs = np.einsum("ij,ij->i", pos, below) + 0.5 * np.einsum("ij,ij->i", pos, neg)
    # At or above a group's threshold: true positives and false positives (reusing the buffers).
    true_pos = np.cumsum(pos, axis=1)
    true_pos -= pos
    np.subtract(n_pos[:, None], true_pos, out=true_pos)
    np.subtract(n_neg[:, None], below, out=below)
    below += true_pos
    # A group with positives has true_pos > 0, so the division is only skipped where pos is 0 anyway.
    np.divide(true_pos, below, out=true_pos, where=below > 0)
    precision_sum = np.einsum("ij,ij->i", pos, true_pos)
    with np.errstate(divide="ignore", invalid="ignore"):
        roc = np.where(defined, roc_pairs / (n_pos * n_neg), np.nan)
        ap = np.where(defined, precision_sum / n_pos, np.nan)
    return roc, ap, defined
