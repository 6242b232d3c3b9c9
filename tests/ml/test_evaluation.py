"""ml.evaluation: metric values (by hand and against scikit-learn), latency/size, custom metrics, compare()."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from domain.errors import InvalidInputError
from ml.evaluation import EvalReport, compare, evaluate
from ml.evaluation.resampling import Evidence, resampled_ece, resampled_macro_f1

LATENCY_KEYS = ("latency_p50_ms_b1", "latency_p99_ms_b1", "latency_p50_ms_b32", "latency_p99_ms_b32")


# Custom metrics referenced by import path (tests.ml.test_evaluation:...).
def my_metric(labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray) -> float:
    """Share of examples predicted as class 0."""
    return float(np.mean(predictions == 0))


def nan_metric(labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray) -> float:
    return float("nan")


def failing_metric(labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray) -> float:
    raise ZeroDivisionError("boom")


def ece(labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray) -> float:
    """Named like a built-in metric, which must be refused rather than silently overwrite it."""
    return 0.0


NOT_CALLABLE = 3


def _logits(probabilities: list[list[float]]) -> torch.Tensor:
    # nn.Identity over log-probabilities: softmax gives the hand-chosen probabilities back.
    return torch.log(torch.tensor(probabilities, dtype=torch.float64)).float()


def _eval_identity(logits: torch.Tensor, labels: list[int] | torch.Tensor, num_classes: int, **kwargs) -> EvalReport:
    y = labels if isinstance(labels, torch.Tensor) else torch.tensor(labels)
    return evaluate(nn.Identity(), logits, y, num_classes=num_classes, measure_latency=False, **kwargs)


def _assert_invalid(info: pytest.ExceptionInfo[InvalidInputError], *fragments: str) -> None:
    assert info.value.code == "invalid_input"
    for fragment in fragments:
        assert fragment in str(info.value)


# ---------------------------------------------------------------- hand-computed


HAND_PROBS = [
    [0.70, 0.20, 0.10],  # true 0, pred 0, conf .70 (bin 10)
    [0.30, 0.55, 0.15],  # true 0, pred 1, conf .55 (bin 8)
    [0.05, 0.85, 0.10],  # true 1, pred 1, conf .85 (bin 12)
    [0.18, 0.20, 0.62],  # true 1, pred 2, conf .62 (bin 9)
    [0.10, 0.15, 0.75],  # true 2, pred 2, conf .75 (bin 11)
    [0.04, 0.06, 0.90],  # true 2, pred 2, conf .90 (bin 13)
]
HAND_LABELS = [0, 0, 1, 1, 2, 2]


def test_hand_computed_metrics_confusion_and_per_class() -> None:
    report = _eval_identity(_logits(HAND_PROBS), HAND_LABELS, 3)
    m = report.metrics
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert report.confusion_matrix == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    # class 0: p=1, r=.5; class 1: p=.5, r=.5; class 2: p=2/3, r=1
    assert report.per_class["0"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2.0})
    assert report.per_class["1"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2.0})
    assert report.per_class["2"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2.0})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.8) / 3)
    expected_ll = -(math.log(0.70) + math.log(0.30) + math.log(0.85) + math.log(0.20) + math.log(0.75) + math.log(0.90))
    assert m["log_loss"] == pytest.approx(expected_ll / 6, rel=1e-6)
    # every example in its own bin: ECE = mean |correct - confidence|
    assert m["ece"] == pytest.approx((0.30 + 0.55 + 0.15 + 0.62 + 0.25 + 0.10) / 6, rel=1e-6)
    assert report.predictions.tolist() == [0, 1, 1, 2, 2, 2]
    assert report.correct.tolist() == [True, False, True, False, True, True]
    assert report.labels.dtype == np.int64 and report.predictions.dtype == np.int64
    assert report.probabilities.dtype == np.float32 and report.probabilities.shape == (6, 3)
    assert not any(key.startswith("latency_") for key in m)


def test_ece_shares_bins_and_errors_within_a_bin_cancel() -> None:
    probs = [[0.7, 0.3], [0.7, 0.3], [0.05, 0.95], [0.95, 0.05]]
    report = _eval_identity(_logits(probs), [0, 1, 1, 0], 2)
    # bin (0.667, 0.733]: acc .5 vs conf .7 over 2/4; bin (0.933, 1]: acc 1 vs conf .95 over 2/4
    assert report.metrics["ece"] == pytest.approx(0.5 * 0.2 + 0.5 * 0.05, rel=1e-6)
    expected_ll = -(math.log(0.7) + math.log(0.3) + 2 * math.log(0.95)) / 4
    assert report.metrics["log_loss"] == pytest.approx(expected_ll, rel=1e-6)


def test_zero_division_gives_zero_and_macro_f1_averages_over_present_classes() -> None:
    # class 2 never occurs in the labels and is never predicted; class 1 occurs but is never predicted
    probs = [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1]]
    report = _eval_identity(_logits(probs), [0, 0, 1], 3)
    assert report.per_class["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1.0}
    assert report.per_class["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0.0}
    assert all(not math.isnan(v) for stats in report.per_class.values() for v in stats.values())
    # macro over classes present in the labels (0 and 1), not over all 3
    assert report.metrics["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)
    sk = skm.f1_score(report.labels, report.predictions, average="macro", labels=[0, 1], zero_division=0)
    assert report.metrics["macro_f1"] == pytest.approx(sk)


def test_confidently_wrong_prediction_has_finite_log_loss() -> None:
    report = _eval_identity(torch.tensor([[200.0, -200.0]]), [1], 2)
    assert math.isfinite(report.metrics["log_loss"])
    assert report.metrics["log_loss"] == pytest.approx(-math.log(np.finfo(np.float32).eps), rel=1e-6)


# ---------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_on_random_data(seed: int) -> None:
    torch.manual_seed(seed)
    n, c = 300, 5
    features = torch.randn(n, 8)
    labels = torch.randint(0, c, (n,))
    model = nn.Linear(8, c)
    report = evaluate(model, features, labels, num_classes=c, batch_size=64, measure_latency=False)

    with torch.no_grad():
        expected_probs = torch.softmax(model(features).double(), dim=1).numpy()
    np.testing.assert_allclose(report.probabilities, expected_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(report.predictions, report.probabilities.argmax(axis=1))
    y, p = report.labels, report.predictions
    assert set(y.tolist()) == set(range(c))  # so scikit-learn's default label set is ours

    assert report.metrics["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert report.metrics["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    assert report.metrics["log_loss"] == pytest.approx(
        skm.log_loss(y, report.probabilities, labels=list(range(c))), rel=1e-5
    )
    assert report.confusion_matrix == skm.confusion_matrix(y, p, labels=list(range(c))).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, p, labels=list(range(c)), zero_division=0)
    for k in range(c):
        stats = report.per_class[str(k)]
        assert stats["precision"] == pytest.approx(precision[k])
        assert stats["recall"] == pytest.approx(recall[k])
        assert stats["f1"] == pytest.approx(f1[k])
        assert stats["support"] == support[k]


def test_ece_matches_direct_binned_definition() -> None:
    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(scale=2.0, size=(500, 4)), dtype=torch.float32)
    report = _eval_identity(logits, torch.tensor(rng.integers(0, 4, 500)), 4)
    confidence = report.probabilities.max(axis=1).astype(np.float64)
    correct = report.correct
    ece = 0.0
    for k in range(15):
        in_bin = (confidence > k / 15) & (confidence <= (k + 1) / 15)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    assert report.metrics["ece"] == pytest.approx(ece, rel=1e-9)


def test_batch_size_does_not_change_results_and_eval_mode_is_used_then_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.9), nn.Linear(16, 3))
    model.train()
    features, labels = torch.randn(50, 6), torch.randint(0, 3, (50,))
    a = evaluate(model, features, labels, num_classes=3, batch_size=7, measure_latency=False)
    b = evaluate(model, features, labels, num_classes=3, batch_size=256, measure_latency=False)
    # Dropout at p=0.9 would make two runs differ wildly if the model stayed in training mode.
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-6)
    assert a.metrics == b.metrics
    assert model.training


def test_float_labels_with_whole_values_are_accepted() -> None:
    report = _eval_identity(_logits(HAND_PROBS), torch.tensor(HAND_LABELS, dtype=torch.float32), 3)
    assert report.labels.tolist() == HAND_LABELS


# ---------------------------------------------------------------- latency, size, report


def test_latency_keys_present_positive_and_ordered() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    # 5 rows: the batch-32 measurement must tile them
    report = evaluate(model, torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1]), num_classes=2, latency_budget_s=0.05)
    for key in LATENCY_KEYS:
        assert report.metrics[key] > 0
    assert report.metrics["latency_p99_ms_b1"] >= report.metrics["latency_p50_ms_b1"]
    assert report.metrics["latency_p99_ms_b32"] >= report.metrics["latency_p50_ms_b32"]
    assert report.metrics["latency_p99_ms"] == report.metrics["latency_p99_ms_b1"]  # the contract's gate name


def _quantize(model: nn.Module) -> nn.Module:
    from ml.quantization import quantize

    return quantize(model, "dynamic")  # the int8 variant run by ONNX Runtime


def test_size_and_parameter_count_of_dynamic_quantized_model() -> None:
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    features, labels = torch.randn(40, 64), torch.randint(0, 4, (40,))
    quantized = _quantize(fp32)
    q_report = evaluate(quantized, features, labels, num_classes=4, measure_latency=False)
    f_report = evaluate(fp32, features, labels, num_classes=4, measure_latency=False)
    assert 0 < q_report.metrics["size_bytes"] < f_report.metrics["size_bytes"]
    expected_params = 64 * 256 + 256 + 256 * 4 + 4
    assert f_report.metrics["parameter_count"] == expected_params
    # the ONNX Runtime variant carries its float original's count
    assert q_report.metrics["parameter_count"] == expected_params
    assert q_report.metrics["accuracy"] == pytest.approx(f_report.metrics["accuracy"], abs=0.1)


def test_to_dict_is_json_safe_and_has_no_arrays() -> None:
    report = _eval_identity(_logits(HAND_PROBS), HAND_LABELS, 3)
    data = report.to_dict()
    assert set(data) == {"n_examples", "num_classes", "data_fingerprint", "metrics", "per_class", "confusion_matrix"}
    assert data["n_examples"] == 6 and data["num_classes"] == 3
    assert json.loads(json.dumps(data)) == data


def test_report_evidence_is_read_only() -> None:
    report = _eval_identity(_logits(HAND_PROBS), HAND_LABELS, 3)
    with pytest.raises(ValueError, match="read-only"):
        report.labels[0] = 1
    with pytest.raises(AttributeError):
        report.metrics = {}  # type: ignore[misc]


def test_report_constructed_by_hand_is_validated() -> None:
    with pytest.raises(InvalidInputError) as info:
        EvalReport(
            metrics={},
            per_class={},
            confusion_matrix=[],
            labels=np.array([0, 1]),
            predictions=np.array([0]),
            probabilities=np.full((2, 2), 0.5, dtype=np.float32),
        )
    _assert_invalid(info, "predictions")


# ---------------------------------------------------------------- custom metrics


def test_custom_metric_by_import_path() -> None:
    report = _eval_identity(_logits(HAND_PROBS), HAND_LABELS, 3, custom_metrics=["tests.ml.test_evaluation:my_metric"])
    assert report.metrics["my_metric"] == pytest.approx(1 / 6)


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("tests.ml.test_evaluation", "package.module:function"),
        ("tests.ml.no_such_module:f", "cannot import"),
        ("tests.ml.test_evaluation:missing", "no attribute"),
        ("tests.ml.test_evaluation:NOT_CALLABLE", "not callable"),
        ("tests.ml.test_evaluation:nan_metric", "finite"),
        ("tests.ml.test_evaluation:failing_metric", "ZeroDivisionError"),
    ],
)
def test_bad_custom_metric_is_invalid_input_naming_the_path(path: str, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        _eval_identity(_logits(HAND_PROBS), HAND_LABELS, 3, custom_metrics=[path])
    _assert_invalid(info, repr(path), fragment)


def test_custom_metric_may_not_shadow_a_builtin() -> None:
    with pytest.raises(InvalidInputError) as info:
        _eval_identity(_logits(HAND_PROBS), HAND_LABELS, 3, custom_metrics=["tests.ml.test_evaluation:ece"])
    _assert_invalid(info, "built-in")
    with pytest.raises(InvalidInputError) as info:
        _eval_identity(_logits(HAND_PROBS), HAND_LABELS, 3, custom_metrics=["math:log", "numpy:log"])
    _assert_invalid(info, "'log'")


# ---------------------------------------------------------------- evaluate errors


@pytest.mark.parametrize(
    ("features", "labels", "num_classes", "fragment"),
    [
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 3, "empty"),
        (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), 3, "4 rows but labels has 3"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), 3, "[0, 3)"),
        (torch.zeros(2, 3), torch.tensor([-1, 0]), 3, "[0, 3)"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.5]), 3, "whole class indices"),
        (torch.zeros(2, 3), torch.tensor([[0], [1]]), 3, "1-D"),
        (torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 1]), 3, "NaN"),
        (torch.tensor([[0.0, float("inf"), 1.0]]), torch.tensor([0]), 3, "NaN or +inf"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), 4, "num_classes=4"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), 1, ">= 2"),
    ],
)
def test_bad_input_is_invalid_input(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, fragment: str
) -> None:
    with pytest.raises(InvalidInputError) as info:
        evaluate(nn.Identity(), features, labels, num_classes=num_classes, measure_latency=False)
    _assert_invalid(info, fragment)


def test_bad_batch_size_and_non_cpu_model_are_invalid_input() -> None:
    with pytest.raises(InvalidInputError) as info:
        _eval_identity(_logits(HAND_PROBS), HAND_LABELS, 3, batch_size=0)
    _assert_invalid(info, "batch_size")
    with pytest.raises(InvalidInputError) as info:
        evaluate(nn.Linear(3, 2, device="meta"), torch.zeros(2, 3), torch.tensor([0, 1]), num_classes=2)
    _assert_invalid(info, "model.cpu()")


# ---------------------------------------------------------------- compare


class _FixedLogits(nn.Module):
    """Returns preset logits for row ids, so two 'models' can be evaluated on the very same features."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def _noisy_reports(n: int = 400, c: int = 3, seed: int = 0) -> tuple[EvalReport, EvalReport]:
    """A strong candidate (signal + noise) and a champion that guesses (noise only), same data."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=gen)
    strong = 3.0 * nn.functional.one_hot(labels, c).float() + torch.randn(n, c, generator=gen)
    weak = torch.randn(n, c, generator=gen)
    row_ids = torch.arange(n, dtype=torch.float32)[:, None]
    return tuple(  # type: ignore[return-value]
        evaluate(_FixedLogits(logits), row_ids, labels, num_classes=c, measure_latency=False)
        for logits in (strong, weak)
    )


def test_compare_identical_reports_interval_contains_zero() -> None:
    report, _ = _noisy_reports()
    result = compare(report, report)
    assert set(result) == {"accuracy", "macro_f1", "log_loss", "ece", "roc_auc", "pr_auc"}
    for comparison in result.values():
        assert comparison.difference == 0.0
        assert comparison.ci_low <= 0.0 <= comparison.ci_high
        assert comparison.n_examples == 400 and comparison.n_resamples == 1000 and comparison.confidence == 0.95


def test_compare_clearly_better_candidate() -> None:
    candidate, champion = _noisy_reports()
    result = compare(candidate, champion)
    accuracy = result["accuracy"]
    assert accuracy.candidate == candidate.metrics["accuracy"] and accuracy.champion == champion.metrics["accuracy"]
    assert accuracy.difference == pytest.approx(accuracy.candidate - accuracy.champion)
    assert 0 < accuracy.ci_low <= accuracy.difference <= accuracy.ci_high
    assert result["macro_f1"].ci_low > 0 and result["macro_f1"].higher_is_better
    assert result["log_loss"].ci_high < 0 and not result["log_loss"].higher_is_better
    assert not result["ece"].higher_is_better
    assert json.loads(json.dumps(accuracy.to_dict()))["ci_low"] == accuracy.ci_low


def test_compare_same_seed_same_interval() -> None:
    candidate, champion = _noisy_reports()
    a = compare(candidate, champion, seed=7)
    b = compare(candidate, champion, seed=7)
    c = compare(candidate, champion, seed=8)
    assert a == b
    assert (a["log_loss"].ci_low, a["log_loss"].ci_high) != (c["log_loss"].ci_low, c["log_loss"].ci_high)


def test_compare_confidence_widens_interval() -> None:
    candidate, champion = _noisy_reports()
    narrow = compare(candidate, champion, metrics=["log_loss"], confidence=0.5)["log_loss"]
    wide = compare(candidate, champion, metrics=["log_loss"], confidence=0.99)["log_loss"]
    assert wide.ci_low < narrow.ci_low < narrow.ci_high < wide.ci_high


def test_compare_custom_metric_by_path() -> None:
    candidate, champion = _noisy_reports()
    path = "tests.ml.test_evaluation:my_metric"
    result = compare(candidate, champion, metrics=[path, "accuracy"])
    assert result[path].candidate == pytest.approx(
        my_metric(candidate.labels, candidate.predictions, candidate.probabilities)
    )
    assert result[path].ci_low <= result[path].difference <= result[path].ci_high
    assert result[path].higher_is_better


def test_compare_refuses_different_data() -> None:
    candidate, _ = _noisy_reports(n=400, seed=0)
    shorter, _ = _noisy_reports(n=399, seed=0)
    other_labels, _ = _noisy_reports(n=400, seed=1)
    with pytest.raises(InvalidInputError) as info:
        compare(candidate, shorter)
    _assert_invalid(info, "different data", "400", "399")
    with pytest.raises(InvalidInputError) as info:
        compare(candidate, other_labels)
    _assert_invalid(info, "labels differ")


def test_compare_refuses_same_labels_with_different_features() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    a = _eval_identity(_logits(HAND_PROBS), labels, 3)
    b = _eval_identity(_logits(HAND_PROBS) + 0.01, labels, 3)
    assert a.data_fingerprint is not None and a.data_fingerprint != b.data_fingerprint
    with pytest.raises(InvalidInputError) as info:
        compare(a, b)
    _assert_invalid(info, "features differ")
    assert compare(a, _eval_identity(_logits(HAND_PROBS), labels, 3))["accuracy"].difference == 0.0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n_resamples": 999}, ">= 1000"),
        ({"confidence": 1.0}, "between 0 and 1"),
        ({"confidence": 0.0}, "between 0 and 1"),
        ({"metrics": ["accuracy", "latency_p50_ms_b1"]}, "allowed: accuracy, macro_f1, log_loss, ece"),
        ({"metrics": []}, "non-empty"),
        ({"metrics": ["tests.ml.test_evaluation:missing"]}, "no attribute"),
    ],
)
def test_compare_rejects_bad_arguments(kwargs: dict[str, object], fragment: str) -> None:
    report, _ = _noisy_reports(n=50)
    with pytest.raises(InvalidInputError) as info:
        compare(report, report, **kwargs)  # type: ignore[arg-type]
    _assert_invalid(info, fragment)


def test_vectorised_resample_statistics_match_per_resample_definitions() -> None:
    rng = np.random.default_rng(5)
    candidate, _ = _noisy_reports(n=120, c=4, seed=2)
    evidence = Evidence.of(candidate)
    idx = rng.integers(0, 120, size=(25, 120))
    f1 = resampled_macro_f1(evidence, idx)
    ece = resampled_ece(evidence, idx)
    confidence = candidate.probabilities.max(axis=1).astype(np.float64)
    for r, row in enumerate(idx):
        y, p = candidate.labels[row], candidate.predictions[row]
        expected_f1 = skm.f1_score(y, p, average="macro", labels=np.unique(y), zero_division=0)
        assert f1[r] == pytest.approx(expected_f1)
        conf, correct = confidence[row], (y == p)
        expected_ece = 0.0
        for k in range(15):
            in_bin = (conf > k / 15) & (conf <= (k + 1) / 15)
            if in_bin.any():
                expected_ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
        assert ece[r] == pytest.approx(expected_ece, rel=1e-9, abs=1e-12)
