"""ml.evaluation's ranking metrics (roc_auc, pr_auc): by hand, against scikit-learn, over resamples, in compare()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize
from torch import nn

from ml.evaluation import EvalReport, compare, evaluate
from ml.evaluation import comparison as comparison_module
from ml.evaluation.ranking import RankingEvidence, resampled_ranking


def error_cost(labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray) -> float:
    """A custom lower-is-better metric: the share of wrong predictions."""
    return float(np.mean(labels != predictions))


error_cost.higher_is_better = False  # type: ignore[attr-defined]


def _report(probabilities: np.ndarray, labels: np.ndarray) -> EvalReport:
    probs = torch.tensor(np.asarray(probabilities, dtype=np.float64))
    return evaluate(
        nn.Identity(), torch.log(probs).float(), torch.tensor(labels), num_classes=probs.shape[1], measure_latency=False
    )


def _random_probabilities(rng: np.random.Generator, labels: np.ndarray, c: int, strength: float) -> np.ndarray:
    logits = rng.normal(size=(labels.size, c)) + strength * np.eye(c)[labels]
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    # Rounding makes many scores tie, so the midrank and tied-threshold handling is exercised.
    probabilities = np.clip(np.round(probabilities, 2), 0.01, None)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def test_binary_by_hand_with_ties_as_midranks() -> None:
    # scores of class 1: positives 0.8, 0.4; negatives 0.4, 0.2. Pairs: (0.8 > 0.4), (0.8 > 0.2),
    # (0.4 tie 0.4) counts 1/2, (0.4 > 0.2): AUC = 3.5 / 4.
    p1 = np.array([0.8, 0.4, 0.4, 0.2])
    report = _report(np.stack([1 - p1, p1], axis=1), np.array([1, 1, 0, 0]))
    assert report.metrics["roc_auc"] == pytest.approx(3.5 / 4)
    # thresholds 0.8 (precision 1, recall 1/2) and 0.4 taken as one (precision 2/3, recall 1)
    assert report.metrics["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_matches_sklearn_with_class_1_positive(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(400) < 0.3).astype(np.int64)
    report = _report(_random_probabilities(rng, labels, 2, 1.0), labels)
    scores = report.probabilities[:, 1]
    assert report.metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(report.labels, scores), abs=1e-12)
    assert report.metrics["pr_auc"] == pytest.approx(skm.average_precision_score(report.labels, scores), abs=1e-12)


def test_multiclass_is_macro_one_vs_rest_like_sklearn() -> None:
    rng = np.random.default_rng(3)
    c = 5
    labels = rng.integers(0, c, 500)
    report = _report(_random_probabilities(rng, labels, c, 1.5), labels)
    y, p = report.labels, report.probabilities
    expected_roc = skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    expected_ap = skm.average_precision_score(label_binarize(y, classes=range(c)), p, average="macro")
    assert report.metrics["roc_auc"] == pytest.approx(expected_roc, abs=1e-9)
    assert report.metrics["pr_auc"] == pytest.approx(expected_ap, abs=1e-12)


def test_a_set_of_one_class_is_undefined_not_one_half() -> None:
    report = _report(np.array([[0.3, 0.7], [0.6, 0.4], [0.5, 0.5]]), np.array([1, 1, 1]))
    assert math.isnan(report.metrics["roc_auc"]) and math.isnan(report.metrics["pr_auc"])
    assert report.to_dict()["metrics"]["roc_auc"] is None
    assert report.metrics["accuracy"] == pytest.approx(1 / 3)


def test_resampled_rounds_match_per_round_sklearn_and_skip_absent_classes() -> None:
    rng = np.random.default_rng(5)
    c, n = 4, 60
    labels = np.repeat(np.arange(c), [30, 20, 8, 2])  # class 3 is often absent from a resample
    probabilities = _random_probabilities(rng, labels, c, 1.0).astype(np.float32)
    idx = rng.integers(0, n, size=(40, n))
    idx[0] = np.where(labels == 0)[0][rng.integers(0, 30, n)]  # a round of class 0 only
    values = resampled_ranking(RankingEvidence.build(labels, probabilities), idx)
    assert math.isnan(values["roc_auc"][0]) and math.isnan(values["pr_auc"][0])
    skipped = 0
    for r in range(1, idx.shape[0]):
        y, p = labels[idx[r]], probabilities[idx[r]]
        present = np.unique(y)
        skipped += present.size < c
        expected_roc = np.mean([skm.roc_auc_score(y == k, p[:, k]) for k in present])
        expected_ap = np.mean([skm.average_precision_score(y == k, p[:, k]) for k in present])
        assert values["roc_auc"][r] == pytest.approx(expected_roc, abs=1e-12)
        assert values["pr_auc"][r] == pytest.approx(expected_ap, abs=1e-12)
    assert skipped > 0  # the absent-class path was taken


def _binary_pair(n: int, positives: int, seed: int = 0) -> tuple[EvalReport, EvalReport]:
    """A sharp candidate and a blurry champion on the same binary labels and rows."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=np.int64)
    labels[rng.choice(n, positives, replace=False)] = 1
    row_ids = torch.arange(n, dtype=torch.float32)[:, None]

    def fixed(signal: float) -> EvalReport:
        logit = signal * (2 * labels - 1) + rng.normal(size=n)
        table = torch.tensor(np.stack([np.zeros(n), logit], axis=1), dtype=torch.float32)
        model = nn.Embedding.from_pretrained(table)
        return evaluate(
            nn.Sequential(nn.Flatten(0), _Long(), model),
            row_ids,
            torch.tensor(labels),
            num_classes=2,
            measure_latency=False,
        )

    return fixed(2.0), fixed(0.5)


class _Long(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()


def test_compare_gives_paired_intervals_on_ranking_metrics() -> None:
    candidate, champion = _binary_pair(400, 120)
    result = compare(candidate, champion, metrics=["roc_auc", "pr_auc"])
    for name in ("roc_auc", "pr_auc"):
        c = result[name]
        assert c.candidate == candidate.metrics[name] and c.champion == champion.metrics[name]
        assert 0 < c.ci_low <= c.difference <= c.ci_high and c.higher_is_better
        assert c.undefined_resamples == 0
    same = compare(candidate, candidate, metrics=["roc_auc"])["roc_auc"]
    assert same.difference == 0.0 and same.ci_low == same.ci_high == 0.0


def test_one_class_resamples_are_counted_and_too_many_make_the_interval_undefined() -> None:
    # 3 positives in 100: (97/100)^100 = 4.8 % of resamples have none, more than a 95 % interval's 2.5 % tail
    rare = compare(*_binary_pair(100, 3), metrics=["roc_auc"])["roc_auc"]
    assert 20 < rare.undefined_resamples < 90
    assert math.isnan(rare.ci_low) and math.isnan(rare.ci_high) and math.isfinite(rare.difference)
    # 6 in 100: 0.2 % of resamples, left out of a defined interval
    enough = compare(*_binary_pair(100, 6), metrics=["roc_auc"])["roc_auc"]
    assert 0 < enough.undefined_resamples < 25
    assert math.isfinite(enough.ci_low) and enough.ci_low <= enough.difference <= enough.ci_high


def test_bootstrap_is_chunked_without_changing_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    candidate, champion = _binary_pair(300, 100)
    whole = compare(candidate, champion, metrics=["roc_auc", "pr_auc", "accuracy"])
    monkeypatch.setattr(comparison_module, "_CHUNK_ELEMENTS", 300 * 7)  # 7 rounds per chunk
    chunked = compare(candidate, champion, metrics=["roc_auc", "pr_auc", "accuracy"])
    assert chunked == whole


def test_custom_metric_direction_reaches_the_comparison() -> None:
    candidate, champion = _binary_pair(300, 100)
    result = compare(candidate, champion, metrics=["tests.ml.test_evaluation_ranking:error_cost"])
    cost = result["tests.ml.test_evaluation_ranking:error_cost"]
    assert cost.higher_is_better is False and cost.difference < 0
