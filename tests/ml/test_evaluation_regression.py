"""ml.evaluation for regression: metric values against scikit-learn, target units, the paired bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from domain.errors import InvalidInputError
from ml.evaluation import (
    REGRESSION_METRICS,
    EvalReport,
    RegressionReport,
    compare,
    disagreement,
    evaluate,
    evaluate_regression,
)
from ml.evaluation import comparison as comparison_module

REGRESSION_NAMES = ("rmse", "mae", "r2", "mape")


def overshoot(targets: np.ndarray, predictions: np.ndarray) -> float:
    """A custom lower-is-better regression metric: the mean of the positive errors."""
    return float(np.mean(np.clip(predictions - targets, 0, None)))


overshoot.higher_is_better = False  # type: ignore[attr-defined]


def _evaluate(predictions: np.ndarray, targets: np.ndarray, **kwargs) -> RegressionReport:
    # nn.Identity over the predictions: the model "predicts" exactly the chosen values. Its features
    # then differ per model, so the test vouches for "same rows" as a caller with raw row ids would.
    features = torch.tensor(np.asarray(predictions, dtype=np.float64))
    kwargs.setdefault("data_fingerprint", "the-same-rows")
    return evaluate_regression(nn.Identity(), features, torch.tensor(targets), measure_latency=False, **kwargs)


def _data(n: int, outputs: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Different scales per output, far from 0 so mape is defined.
    return rng.normal(loc=1000.0 * np.arange(1, outputs + 1), scale=50.0 * np.arange(1, outputs + 1), size=(n, outputs))


def _noisy(targets: np.ndarray, scale: float, seed: int) -> np.ndarray:
    return targets + np.random.default_rng(seed).normal(scale=scale, size=targets.shape)


def _assert_invalid(info: pytest.ExceptionInfo[InvalidInputError], *fragments: str) -> None:
    assert info.value.code == "invalid_input"
    for fragment in fragments:
        assert fragment in str(info.value)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("outputs", [1, 3])
def test_metrics_match_sklearn_macro_over_outputs(outputs: int) -> None:
    y = _data(500, outputs)
    p = _noisy(y, 20.0, seed=1)
    report = _evaluate(p, y)
    assert report.n_outputs == outputs and report.n_examples == 500
    m = report.metrics
    assert m["rmse"] == pytest.approx(np.mean(np.sqrt(skm.mean_squared_error(y, p, multioutput="raw_values"))))
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, p), rel=1e-12)
    assert m["r2"] == pytest.approx(skm.r2_score(y, p), rel=1e-10)
    assert m["mape"] == pytest.approx(skm.mean_absolute_percentage_error(y, p), rel=1e-12)
    assert report.undefined_metrics == {}


def test_one_dimensional_targets_are_one_output_by_hand() -> None:
    report = _evaluate(np.array([1.0, 2.0, 5.0]), np.array([2.0, 2.0, 3.0]))
    # errors -1, 0, 2: mse 5/3, mae 1, SS_res 5, SS_tot (mean 7/3) = 2/3, mape (1/2 + 0 + 2/3) / 3
    assert report.targets.shape == (3, 1) and report.predictions.shape == (3, 1)
    assert report.metrics["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert report.metrics["mae"] == pytest.approx(1.0)
    assert report.metrics["r2"] == pytest.approx(1 - 5 / (2 / 3))
    assert report.metrics["mape"] == pytest.approx((0.5 + 2 / 3) / 3)


def test_inverse_maps_outputs_to_target_units() -> None:
    y = _data(200, 2)
    p = _noisy(y, 10.0, seed=2)
    mean, std = y.mean(axis=0), y.std(axis=0)
    standardized = (p - mean) / std
    report = _evaluate(standardized, y, inverse=lambda z: z * std + mean)
    np.testing.assert_allclose(report.predictions, p, rtol=1e-6)
    assert report.metrics["rmse"] == pytest.approx(_evaluate(p, y).metrics["rmse"], rel=1e-6)


def test_cost_metrics_and_a_real_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).train()
    x = torch.randn(64, 4)
    report = evaluate_regression(model, x, torch.randn(64, 2), latency_budget_s=0.05, batch_size=16)
    assert model.training  # the previous mode is restored
    for key in ("latency_p50_ms", "latency_p99_ms_b32", "size_bytes"):
        assert report.metrics[key] > 0
    assert report.metrics["parameter_count"] == 4 * 8 + 8 + 8 * 2 + 2
    with torch.no_grad():
        np.testing.assert_allclose(report.predictions, model(x).double().numpy(), rtol=1e-6)


def test_report_is_read_only_and_json_safe() -> None:
    y = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    report = _evaluate(y + 0.5, y)
    with pytest.raises(ValueError):
        report.targets[0, 0] = 9.0
    with pytest.raises(ValueError):
        report.predictions[0, 0] = 9.0
    summary = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert summary["task"] == "regression" and summary["n_outputs"] == 2
    # a 0 target (mape) and an output of equal targets (r2) are undefined: null, with the reason
    assert summary["metrics"]["mape"] is None and summary["metrics"]["r2"] is None
    assert "1 of 3 rows" in summary["undefined_metrics"]["mape"]
    assert "[1]" in summary["undefined_metrics"]["r2"]
    assert summary["metrics"]["rmse"] == pytest.approx(0.5)


def test_custom_metric_gets_targets_and_predictions() -> None:
    y = _data(50, 2)
    report = _evaluate(y + 1.0, y, custom_metrics=["tests.ml.test_evaluation_regression:overshoot"])
    assert report.metrics["overshoot"] == pytest.approx(1.0)


def test_bad_input_is_refused_with_the_fix() -> None:
    y = _data(10, 2)
    with pytest.raises(InvalidInputError) as info:
        evaluate_regression(nn.Linear(2, 3), torch.randn(10, 2), torch.tensor(y), measure_latency=False)
    _assert_invalid(info, "outputs=2", "(10, 3)")
    bad = y.copy()
    bad[4, 1] = np.nan
    with pytest.raises(InvalidInputError) as info:
        _evaluate(y, bad)
    _assert_invalid(info, "1 row(s), first row 4")
    with pytest.raises(InvalidInputError) as info:
        _evaluate(y, y, inverse=lambda z: z[:, :1])
    _assert_invalid(info, "inverse transform", "(10, 2)")
    with pytest.raises(InvalidInputError) as info:
        _evaluate(y[:9], y)
    _assert_invalid(info, "9 rows", "10")


# ---------------------------------------------------------------- compare


def test_identity_resample_equals_the_report_and_directions() -> None:
    y = _data(300, 2)
    candidate, champion = _evaluate(_noisy(y, 10.0, 1), y), _evaluate(_noisy(y, 12.0, 2), y)
    result = compare(candidate, champion, metrics=list(REGRESSION_NAMES))
    for name in REGRESSION_NAMES:
        assert result[name].candidate == candidate.metrics[name]
        assert result[name].champion == champion.metrics[name]
        assert result[name].higher_is_better is REGRESSION_METRICS[name]
    assert [name for name in REGRESSION_NAMES if result[name].higher_is_better] == ["r2"]


def test_clearly_better_candidate_excludes_zero_equal_one_includes_it() -> None:
    y = _data(1000, 1)
    champion = _evaluate(_noisy(y, 30.0, 1), y)
    better = compare(_evaluate(_noisy(y, 20.0, 2), y), champion)
    assert set(better) == set(REGRESSION_NAMES)  # the default: every metric defined on this data
    assert better["rmse"].ci_high < 0 and better["mae"].ci_high < 0 and better["r2"].ci_low > 0
    # another model of the same quality: the interval straddles 0
    equal = compare(_evaluate(_noisy(y, 30.0, 3), y), champion)
    for name in REGRESSION_NAMES:
        assert equal[name].ci_low < 0 < equal[name].ci_high
    same = compare(champion, champion)["rmse"]
    assert same.difference == same.ci_low == same.ci_high == 0.0


def test_refuses_different_data_and_mixed_kinds() -> None:
    y = _data(100, 1)
    report = _evaluate(y + 1, y)
    shifted = y.copy()
    shifted[:3] += 1.0
    with pytest.raises(InvalidInputError) as info:
        compare(report, _evaluate(y + 1, shifted))
    _assert_invalid(info, "3 of 100 targets differ")
    with pytest.raises(InvalidInputError) as info:
        compare(report, _evaluate(y[:50] + 1, y[:50]))
    _assert_invalid(info, "100 examples", "50")
    with pytest.raises(InvalidInputError) as info:
        compare(report, _evaluate(y + 1, y, data_fingerprint="other-rows"))
    _assert_invalid(info, "features differ")
    with pytest.raises(InvalidInputError) as info:
        compare(report, _evaluate(np.hstack([y, y]), np.hstack([y, y])))
    _assert_invalid(info, "different output counts")
    classifier = evaluate(nn.Identity(), torch.randn(100, 2), torch.zeros(100), num_classes=2, measure_latency=False)
    for pair in ((report, classifier), (classifier, report)):
        with pytest.raises(InvalidInputError) as info:
            compare(*pair)  # type: ignore[arg-type]
        _assert_invalid(info, "regression report", "classification report")
    with pytest.raises(InvalidInputError) as info:
        compare(report, report, metrics=["accuracy"])
    _assert_invalid(info, "unknown metric", "rmse")
    with pytest.raises(InvalidInputError) as info:
        disagreement(report, classifier)
    _assert_invalid(info, "one task")
    assert isinstance(classifier, EvalReport) and classifier.task == "classification"


def test_regression_disagreement_counts_rows_whose_prediction_bin_changes() -> None:
    y = np.linspace(0, 100, 200).reshape(-1, 1)
    champion = _evaluate(y, y)
    shifted = y.copy()
    shifted[:20] += 30.0  # 20 rows move far; the rest stay put
    candidate = _evaluate(shifted, y)
    edges = [25.0, 50.0, 75.0]
    moved = np.searchsorted(edges, shifted[:, 0], side="right") != np.searchsorted(edges, y[:, 0], side="right")
    assert disagreement(candidate, champion, edges) == pytest.approx(moved.mean())
    assert 0 < disagreement(candidate, champion, edges) <= 0.1
    assert disagreement(champion, champion, edges) == 0.0


def test_mape_with_a_zero_target_is_refused_only_when_asked_for() -> None:
    y = _data(200, 1)
    y[[5, 17]] = 0.0
    candidate, champion = _evaluate(_noisy(y, 10.0, 1), y), _evaluate(_noisy(y, 20.0, 2), y)
    assert math.isnan(candidate.metrics["mape"]) and "mape" in candidate.undefined_metrics
    assert math.isfinite(candidate.metrics["rmse"])
    assert set(compare(candidate, champion)) == {"rmse", "mae", "r2"}
    with pytest.raises(InvalidInputError) as info:
        compare(candidate, champion, metrics=["rmse", "mape"])
    _assert_invalid(info, "mape", "2 of 200 rows", "mae or rmse")


def test_bootstrap_is_chunked_without_changing_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    y = _data(300, 2)
    candidate, champion = _evaluate(_noisy(y, 10.0, 1), y), _evaluate(_noisy(y, 11.0, 2), y)
    names = [*REGRESSION_NAMES, "tests.ml.test_evaluation_regression:overshoot"]
    whole = compare(candidate, champion, metrics=names)
    monkeypatch.setattr(comparison_module, "_CHUNK_ELEMENTS", 300 * 2 * 7)  # 7 rounds per chunk
    chunked = compare(candidate, champion, metrics=names)
    assert chunked == whole
    cost = whole["tests.ml.test_evaluation_regression:overshoot"]
    assert cost.higher_is_better is False and cost.candidate == pytest.approx(overshoot(y, candidate.predictions))


def test_r2_on_resamples_of_equal_targets_is_left_out() -> None:
    # 3 distinct targets in 12 rows: some resamples draw one value only, where r2 is undefined
    y = np.array([1.0] * 10 + [2.0, 3.0])
    result = compare(_evaluate(y + 0.1, y), _evaluate(y - 0.2, y), metrics=["r2", "rmse"])
    assert result["r2"].undefined_resamples > 0 and result["rmse"].undefined_resamples == 0
