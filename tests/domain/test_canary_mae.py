"""The regression canary's delayed-label check (`mae_check`), its place in the spending plan and in
`next_canary_step`: pass, fail and not yet on known inputs, and its false-failure rate by simulation."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from domain.canary import CanaryAction, CanaryWindow, RolloutProgress, next_canary_step
from domain.canary_stats import AbsErrors, VariantSample, judge_window, mae_check
from domain.evidence import CheckOutcome, VariantWindow
from domain.histogram import LatencyHistogram
from domain.sequential import SpendingPlan, alpha_for, total_alpha
from domain.spec import CanarySpec

PASS, FAIL, NOT_YET = CheckOutcome.PASS, CheckOutcome.FAIL, CheckOutcome.NOT_YET
POLICY = CanarySpec(steps=[10, 50, 100], min_requests=200, min_labels=50, max_error_increase=0.1)


def sums(errors: npt.NDArray[np.float64]) -> AbsErrors:
    """A variant's labelled rows as the model server sums them."""
    absolute = np.abs(errors)
    return AbsErrors(int(absolute.size), float(absolute.sum()), float((absolute**2).sum()))


def draw(rng: np.random.Generator, n: int, scale: float) -> AbsErrors:
    return sums(rng.normal(0.0, scale, size=n))


def test_an_equal_canary_passes_at_the_planned_sample_and_is_proven_early_with_many_labels() -> None:
    rng = np.random.default_rng(1)
    at_plan = mae_check(draw(rng, 60, 10.0), draw(rng, 60, 10.0), max_increase=0.1, alpha=0.01, final=True)
    assert at_plan.outcome is PASS and at_plan.check == "mae"
    assert (at_plan.canary_n, at_plan.champion_n, at_plan.threshold) == (60, 60, 0.1)
    early = mae_check(draw(rng, 20_000, 10.0), draw(rng, 20_000, 10.0), max_increase=0.1, alpha=0.01, final=False)
    assert early.outcome is PASS  # the upper bound of the increase is already below 10 %
    assert early.interval is not None and early.interval[1] < 0.1
    assert early.measures["canary_mae"] == pytest.approx(10.0 * np.sqrt(2 / np.pi), rel=0.03)


def test_a_canary_whose_error_is_clearly_larger_fails_with_its_evidence() -> None:
    rng = np.random.default_rng(2)
    check = mae_check(draw(rng, 200, 20.0), draw(rng, 200, 10.0), max_increase=0.1, alpha=0.01, final=True)
    assert check.outcome is FAIL
    assert check.statistic is not None and check.statistic == pytest.approx(1.0, abs=0.3)  # +100 %
    assert check.interval is not None and check.interval[0] > 0.1  # Fieller's bound agrees with the test
    assert check.p_value is not None and check.p_value <= 0.01
    assert "MAE canary" in check.reason and "allowed +10 %" in check.reason


def test_within_the_margin_the_check_does_not_fail() -> None:
    rng = np.random.default_rng(3)
    check = mae_check(draw(rng, 400, 10.5), draw(rng, 400, 10.0), max_increase=0.1, alpha=0.01, final=True)
    assert check.outcome is PASS


def test_no_labels_or_a_level_of_zero_is_not_yet() -> None:
    rng = np.random.default_rng(4)
    assert mae_check(AbsErrors(0, 0.0, 0.0), draw(rng, 50, 1.0), max_increase=0.1, alpha=0.01, final=True).outcome is (
        NOT_YET
    )
    # before the planned sample the plan spends nothing (interim_looks 0): neither fail nor pass
    worse = mae_check(draw(rng, 30, 50.0), draw(rng, 30, 1.0), max_increase=0.1, alpha=0.0, final=False)
    assert worse.outcome is NOT_YET and worse.interval is None


def test_constant_errors_have_a_certain_sign() -> None:
    same = mae_check(AbsErrors(50, 50.0, 50.0), AbsErrors(50, 50.0, 50.0), max_increase=0.1, alpha=0.01, final=True)
    assert same.outcome is PASS
    worse = mae_check(AbsErrors(50, 100.0, 200.0), AbsErrors(50, 50.0, 50.0), max_increase=0.1, alpha=0.01, final=True)
    assert worse.outcome is FAIL
    perfect = mae_check(AbsErrors(50, 0.0, 0.0), AbsErrors(50, 0.0, 0.0), max_increase=0.1, alpha=0.01, final=True)
    assert perfect.outcome is PASS and perfect.statistic is None  # no relative change of a zero MAE


@pytest.mark.parametrize(("increase", "most", "least"), [(0.1, 0.05, 0.025), (0.0, 0.05, 0.025)])
def test_at_the_margin_the_check_fails_at_most_alpha_of_windows(increase: float, most: float, least: float) -> None:
    """Canary MAE exactly (1 + margin) x the champion's (skewed, exponential errors): the boundary
    of H0, where the false-failure rate is largest; it must stay at alpha (and near it: not vacuous)."""
    rng = np.random.default_rng(5)
    alpha, windows, n = 0.05, 3000, 200
    failed = sum(
        mae_check(
            sums(rng.exponential(1.0 + increase, n)),
            sums(rng.exponential(1.0, n)),
            max_increase=increase,
            alpha=alpha,
            final=True,
        ).outcome
        is FAIL
        for _ in range(windows)
    )
    rate = failed / windows
    assert least <= rate <= most + 3 * np.sqrt(alpha * (1 - alpha) / windows), rate


def test_equal_models_rarely_fail() -> None:
    rng = np.random.default_rng(6)
    failed = sum(
        mae_check(draw(rng, 50, 7.0), draw(rng, 50, 7.0), max_increase=0.1, alpha=0.05, final=True).outcome is FAIL
        for _ in range(2000)
    )
    assert failed / 2000 < 0.05


# ------------------------------------------------------------------ the plan and the window


def test_a_regression_plan_tests_mae_in_accuracys_place_with_the_same_level() -> None:
    classifier = SpendingPlan.for_policy(POLICY.steps, 0.95)
    regression = SpendingPlan.for_policy(POLICY.steps, 0.95, task="regression")
    assert "mae" in regression.checks_at(0) and "accuracy" not in regression.checks_at(0)
    assert regression.checks_at(2) == ("error_rate", "mae")
    assert alpha_for(regression, 0, "mae", 1, final=True) == alpha_for(classifier, 0, "accuracy", 1, final=True)
    assert alpha_for(regression, 0, "accuracy", 1, final=True) == 0.0
    assert total_alpha(regression) == pytest.approx(0.05)


def _sample(requests: int, labels: AbsErrors) -> VariantSample:
    latency = LatencyHistogram.of([5.0] * requests)
    shares = {str(b): requests // 10 for b in range(10)}
    return VariantSample(requests, 0, latency, shares, labels.n, 0, labels.total, labels.squares)


def test_judge_window_reads_the_task_from_its_plan() -> None:
    rng = np.random.default_rng(7)
    plan = SpendingPlan.for_policy(POLICY.steps, 0.95, task="regression")
    good = judge_window(_sample(200, draw(rng, 80, 10.0)), _sample(1800, draw(rng, 80, 10.0)), POLICY, plan, 0)
    assert good.outcome is PASS and [c.check for c in good.checks][-1] == "mae"
    mae = good.check("mae")
    assert mae is not None and mae.outcome is PASS
    unlabelled = judge_window(_sample(200, AbsErrors(0, 0, 0)), _sample(1800, AbsErrors(0, 0, 0)), POLICY, plan, 0)
    assert unlabelled.outcome is PASS  # labels are optional, as for accuracy
    required = judge_window(
        _sample(200, AbsErrors(0, 0, 0)), _sample(1800, AbsErrors(0, 0, 0)), POLICY, plan, 0, labels_required=True
    )
    assert required.outcome is NOT_YET


def _window(labels: AbsErrors) -> VariantWindow:
    histogram = LatencyHistogram.of([5.0] * 300)
    return VariantWindow(
        requests=300,
        latency_histogram=histogram,
        class_counts={str(b): 30 for b in range(10)},
        labelled=labels.n,
        abs_error_sum=labels.total,
        abs_error_sq_sum=labels.squares,
    )


def test_next_canary_step_rolls_a_regression_canary_back_on_its_error_and_advances_a_good_one() -> None:
    rng = np.random.default_rng(8)
    worse = CanaryWindow(_window(draw(rng, 100, 30.0)), _window(draw(rng, 100, 10.0)), 31)
    decision = next_canary_step(RolloutProgress(0), worse, POLICY, task="regression")
    assert decision.action is CanaryAction.ROLLBACK and "mae" in decision.reason
    assert any(c.check == "mae" and c.outcome is FAIL for c in decision.evidence)
    # the same window for a classifier has no mae check (and no accuracy labels): it advances
    assert next_canary_step(RolloutProgress(0), worse, POLICY).action is CanaryAction.ADVANCE
    good = CanaryWindow(_window(draw(rng, 100, 10.0)), _window(draw(rng, 100, 10.0)), 31)
    assert next_canary_step(RolloutProgress(0), good, POLICY, task="regression").action is CanaryAction.ADVANCE


def test_windows_of_several_replicas_merge_by_adding_the_sums() -> None:
    rng = np.random.default_rng(9)
    errors = rng.normal(0, 3.0, 120)
    merged = sums(errors)
    parts = [sums(errors[:50]), sums(errors[50:])]
    assert merged.n == sum(p.n for p in parts)
    assert merged.total == pytest.approx(sum(p.total for p in parts))
    assert merged.squares == pytest.approx(sum(p.squares for p in parts))
    window = _window(merged)
    assert window.mae == pytest.approx(float(np.abs(errors).mean()))
