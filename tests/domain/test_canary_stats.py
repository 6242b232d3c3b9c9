"""The canary's statistical checks: each with its three outcomes, the window's judgement, the
spending plan and the power figures used at validation. Reference values come from SciPy 1.17."""

from __future__ import annotations

import random

import numpy as np
import pytest

from domain.canary_power import canary_power, power_problems, window_sizes
from domain.canary_stats import (
    Tally,
    VariantSample,
    accuracy_check,
    binned_counts,
    error_rate_check,
    error_rate_vs_champion_check,
    judge_window,
    latency_check,
    population_stability,
    prediction_drift_check,
)
from domain.distributions import (
    binomial_cdf,
    binomial_sf,
    chi2_isf,
    chi2_sf,
    exceedance_sf,
    hypergeometric_sf,
    noncentral_chi2_sf,
    wilson_interval,
)
from domain.evidence import CheckEvidence, CheckOutcome
from domain.histogram import LatencyHistogram
from domain.outcomes import Verdict
from domain.sequential import CHECKS, SpendingPlan, alpha_for, total_alpha
from domain.spec import CanarySpec

PASS, FAIL, NOT_YET = CheckOutcome.PASS, CheckOutcome.FAIL, CheckOutcome.NOT_YET
UNIFORM = {str(c): 100 for c in range(10)}


def _rng(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - simulated traffic, not a secret


# ------------------------------------------------------------------ distributions


def test_binomial_and_hypergeometric_tails_match_scipy() -> None:
    assert binomial_sf(8, 200, 0.01) == pytest.approx(0.0010125571505207787, rel=1e-9)
    assert binomial_cdf(3, 200, 0.01) == pytest.approx(0.858034034444744, rel=1e-9)
    assert binomial_sf(1100, 100_000, 0.01) == pytest.approx(0.0009117803412450804, rel=1e-7)
    assert hypergeometric_sf(5, 2000, 8, 200) == pytest.approx(0.00041498343885390234, rel=1e-9)
    assert (binomial_sf(0, 5, 0.3), binomial_sf(6, 5, 0.3), binomial_sf(1, 5, 0.0)) == (1.0, 0.0, 0.0)


def test_chi_square_tails_match_scipy() -> None:
    assert chi2_sf(16.92, 9) == pytest.approx(0.04998360638750561, rel=1e-9)
    assert chi2_sf(3, 9) == pytest.approx(0.9642949726850891, rel=1e-9)
    assert chi2_sf(200, 9) == pytest.approx(3.312992393909567e-38, rel=1e-6)
    assert chi2_isf(0.05, 9) == pytest.approx(16.918977604355273, rel=1e-6)
    # Patnaik's approximation, used for planning only: close, not exact.
    assert noncentral_chi2_sf(25, 9, 37) == pytest.approx(0.9649449197660902, abs=0.01)


def test_exceedance_law_matches_a_simulation() -> None:
    rng = _rng(11)
    m, n, k, hits, trials = 40, 20, 38, 0, 20_000
    for _ in range(trials):
        old = sorted(rng.random() for _ in range(m))
        hits += sum(rng.random() > old[k - 1] for _ in range(n)) >= 3
    assert hits / trials == pytest.approx(exceedance_sf(3, n, m, k), abs=0.01)


def test_wilson_interval_holds_zero_errors_near_zero() -> None:
    low, high = wilson_interval(0, 200, 1.645)
    assert low == 0.0
    assert high == pytest.approx(0.013349504534954005)


# ------------------------------------------------------------------ error rate


def test_error_rate_fails_when_the_lower_bound_is_above_the_limit() -> None:
    evidence = error_rate_check(20, 200, max_error_rate=0.01, alpha=0.01, final=False)
    assert evidence.outcome is FAIL
    assert evidence.interval is not None and evidence.interval[0] > 0.01
    assert evidence.p_value is not None and evidence.p_value < 1e-6


def test_error_rate_passes_early_when_the_upper_bound_is_below_the_limit() -> None:
    assert error_rate_check(0, 2000, max_error_rate=0.01, alpha=0.01, final=False).outcome is PASS


def test_error_rate_waits_in_between_and_passes_at_the_planned_sample() -> None:
    # 2 errors in 100: above the limit as a point, but not significantly.
    assert error_rate_check(2, 100, max_error_rate=0.01, alpha=0.01, final=False).outcome is NOT_YET
    assert error_rate_check(2, 100, max_error_rate=0.01, alpha=0.01, final=True).outcome is PASS


def test_error_rate_never_passes_on_no_data_and_never_fails_without_budget() -> None:
    assert error_rate_check(0, 0, max_error_rate=0.01, alpha=0.01, final=True).outcome is NOT_YET
    assert error_rate_check(100, 100, max_error_rate=0.01, alpha=0.0, final=False).outcome is NOT_YET


def test_a_zero_error_limit_fails_on_the_first_error() -> None:
    assert error_rate_check(1, 500, max_error_rate=0.0, alpha=0.01, final=True).outcome is FAIL
    assert error_rate_check(0, 500, max_error_rate=0.0, alpha=0.01, final=True).outcome is PASS


def test_error_rate_vs_champion_fails_only_when_significantly_worse() -> None:
    worse = error_rate_vs_champion_check(Tally(8, 200), Tally(2, 1800), alpha=0.01, final=True)
    assert worse.outcome is FAIL
    assert worse.measures["champion_error_rate"] == pytest.approx(2 / 1800)
    assert error_rate_vs_champion_check(Tally(1, 200), Tally(2, 1800), alpha=0.01, final=True).outcome is PASS
    assert error_rate_vs_champion_check(Tally(1, 200), Tally(2, 1800), alpha=0.01, final=False).outcome is NOT_YET
    assert error_rate_vs_champion_check(Tally(0, 0), Tally(2, 1800), alpha=0.01, final=True).outcome is NOT_YET


# ------------------------------------------------------------------ latency


def _jittered(rng: random.Random, n: int, factor: float = 1.0, extra_ms: float = 0.0) -> LatencyHistogram:
    values = []
    for _ in range(n):
        ms = rng.lognormvariate(0.0, 0.25) * 2.0 + (rng.uniform(1, 5) if rng.random() < 0.02 else 0.0)
        values.append(ms * factor + extra_ms)
    return LatencyHistogram.of(values)


def test_equal_latency_with_shared_jitter_rarely_fails() -> None:
    rng = _rng(2)
    failures = sum(
        latency_check(
            _jittered(rng, 39), _jittered(rng, 148), max_ratio=1.5, slack_ms=0.0, alpha=0.05, final=True
        ).outcome
        is FAIL
        for _ in range(400)
    )
    assert failures / 400 <= 0.05


def test_twice_the_latency_fails_and_names_its_numbers() -> None:
    rng = _rng(4)
    evidence = latency_check(
        _jittered(rng, 200, factor=2.0), _jittered(rng, 1800), max_ratio=1.2, slack_ms=0.0, alpha=0.004, final=True
    )
    assert evidence.outcome is FAIL
    assert evidence.statistic is not None and evidence.statistic > 1.2
    assert {"p50_exceedances", "p99_exceedances", "p99_threshold_ms"} <= set(evidence.measures)


def test_slack_forgives_a_canary_a_few_ms_slower() -> None:
    rng = _rng(6)
    canary, champion = _jittered(rng, 400, extra_ms=2.0), _jittered(rng, 1600)
    assert latency_check(canary, champion, max_ratio=1.2, slack_ms=0.0, alpha=0.01, final=True).outcome is FAIL
    assert latency_check(canary, champion, max_ratio=1.2, slack_ms=5.0, alpha=0.01, final=True).outcome is PASS


def test_latency_waits_for_data_and_for_the_planned_sample() -> None:
    rng = _rng(8)
    empty = LatencyHistogram()
    assert (
        latency_check(empty, _jittered(rng, 50), max_ratio=1.2, slack_ms=0, alpha=0.01, final=True).outcome is NOT_YET
    )
    same = latency_check(_jittered(rng, 50), _jittered(rng, 50), max_ratio=1.2, slack_ms=0, alpha=0.01, final=False)
    assert same.outcome is NOT_YET


# ------------------------------------------------------------------ prediction drift


def test_identical_prediction_distributions_pass_even_when_psi_exceeds_the_limit() -> None:
    # The issue's case: 39 vs 148 requests over 10 classes, PSI above 0.2 by noise alone.
    rng = _rng(1)
    canary = {str(c): 0 for c in range(10)}
    champion = dict(canary)
    for _ in range(39):
        canary[str(rng.randrange(10))] += 1
    for _ in range(148):
        champion[str(rng.randrange(10))] += 1
    evidence = prediction_drift_check(canary, champion, max_psi=0.2, alpha=0.01, final=True)
    assert evidence.statistic is not None and evidence.statistic > 0.2
    assert evidence.outcome is PASS


def test_collapsed_predictions_fail() -> None:
    evidence = prediction_drift_check(
        {"0": 200}, {str(c): 180 for c in range(10)}, max_psi=0.2, alpha=0.004, final=True
    )
    assert evidence.outcome is FAIL
    assert evidence.measures["total_variation"] == pytest.approx(0.9)


def test_a_change_the_gate_expected_is_not_drift_but_a_larger_one_is() -> None:
    # Predictions moved from classes 0 and 1 to class 2: total variation 0.15, PSI about 0.18.
    champion = {"0": 3000, "1": 3000, "2": 3000, "3": 3000}
    canary = {"0": 2100, "1": 2100, "2": 4800, "3": 3000}

    def drift(expected: float | None) -> CheckEvidence:
        return prediction_drift_check(
            canary, champion, max_psi=0.1, alpha=0.01, final=True, expected_disagreement=expected
        )

    assert drift(None).outcome is FAIL
    assert drift(None).measures["total_variation"] == pytest.approx(0.15)
    explained = drift(0.2)
    assert explained.outcome is PASS
    assert explained.measures["total_variation_lower"] < 0.2
    assert drift(0.05).outcome is FAIL


def test_drift_needs_an_effect_above_the_limit_as_well_as_significance() -> None:
    champion = {"0": 50_000, "1": 50_000}
    canary = {"0": 51_500, "1": 48_500}  # significant with this much data, PSI about 0.0009
    assert prediction_drift_check(canary, champion, max_psi=0.2, alpha=0.01, final=True).outcome is PASS


def test_drift_refuses_a_disagreement_that_is_not_a_rate() -> None:
    with pytest.raises(ValueError, match="expected_disagreement"):
        prediction_drift_check(UNIFORM, UNIFORM, max_psi=0.2, alpha=0.01, final=True, expected_disagreement=1.5)


def test_drift_waits_for_predictions() -> None:
    assert prediction_drift_check({}, UNIFORM, max_psi=0.2, alpha=0.01, final=True).outcome is NOT_YET


def test_regression_outputs_are_compared_by_bins() -> None:
    values, edges = [0.1, 0.5, 0.5, 2.0, 9.0], [0.5, 1.0, 5.0]
    # a value on an edge goes to the bin above it, as numpy.searchsorted(side="right") bins in the gate
    assert binned_counts(values, edges) == {"0": 1, "1": 2, "2": 1, "3": 1}
    bins = np.searchsorted(np.asarray(edges), np.asarray(values), side="right")
    labels, counts = np.unique(bins, return_counts=True)
    assert binned_counts(values, edges) == {str(b): int(c) for b, c in zip(labels, counts, strict=True)}
    with pytest.raises(ValueError, match="rise strictly"):
        binned_counts([1.0], [1.0, 1.0])


def test_population_stability_matches_the_project_formula() -> None:
    assert population_stability(UNIFORM, UNIFORM) == 0.0
    assert population_stability({"a": 50, "b": 50}, {"a": 90, "b": 10}) == pytest.approx(
        0.4 * 0.587786664902119 + (-0.4) * (-1.6094379124341003)
    )


# ------------------------------------------------------------------ accuracy


def test_accuracy_fails_a_drop_significantly_beyond_the_margin() -> None:
    evidence = accuracy_check(Tally(340, 400), Tally(2280, 2400), max_drop=0.02, alpha=0.004, final=True)
    assert evidence.outcome is FAIL
    assert evidence.interval is not None and evidence.interval[1] < -0.02


def test_accuracy_passes_early_once_non_inferiority_is_shown() -> None:
    assert accuracy_check(Tally(2880, 3000), Tally(2850, 3000), max_drop=0.02, alpha=0.01, final=False).outcome is PASS


def test_accuracy_waits_when_undecided_and_for_labels() -> None:
    assert accuracy_check(Tally(54, 60), Tally(56, 60), max_drop=0.02, alpha=0.01, final=False).outcome is NOT_YET
    assert accuracy_check(Tally(0, 0), Tally(56, 60), max_drop=0.02, alpha=0.01, final=True).outcome is NOT_YET


def test_evidence_round_trips_as_json_and_reads_as_a_gate_check() -> None:
    evidence = accuracy_check(Tally(340, 400), Tally(2280, 2400), max_drop=0.02, alpha=0.004, final=True)
    assert CheckEvidence.model_validate_json(evidence.model_dump_json()) == evidence
    check = evidence.to_gate_check()
    assert (check.metric, check.verdict, check.threshold) == ("accuracy", Verdict.FAIL, 0.02)
    waiting = error_rate_check(0, 0, max_error_rate=0.01, alpha=0.01, final=True).to_gate_check()
    assert waiting.verdict is Verdict.SKIPPED


# ------------------------------------------------------------------ spending plan


@pytest.mark.parametrize("steps", [[100.0], [10.0, 25.0, 50.0, 100.0], [20.0, 50.0, 100.0]])
@pytest.mark.parametrize("interim_looks", [0, 3])
def test_the_plan_spends_exactly_the_rollout_alpha(steps: list[float], interim_looks: int) -> None:
    plan = SpendingPlan.for_policy(steps, 0.95, interim_looks=interim_looks)
    assert total_alpha(plan) == pytest.approx(0.05)


def test_the_plan_front_loads_steps_and_spares_later_looks() -> None:
    plan = SpendingPlan.for_policy([10, 25, 50, 100], 0.95, interim_looks=2)
    first, second = (alpha_for(plan, s, "latency", 0, final=True) for s in (0, 1))
    assert first > second > 0
    assert alpha_for(plan, 0, "latency", 1, final=False) == pytest.approx(0.05 * 0.4 / 5 * 0.2 / 2)
    assert alpha_for(plan, 0, "latency", 3, final=False) == 0.0
    assert plan.checks_at(3) == ("error_rate", "accuracy")
    assert alpha_for(plan, 3, "latency", 0, final=True) == 0.0
    assert set(plan.checks_at(0)) == set(CHECKS)


def test_without_interim_looks_a_check_is_tested_once_per_window() -> None:
    plan = SpendingPlan.for_policy([50, 100], 0.9)
    assert alpha_for(plan, 0, "error_rate", 1, final=False) == 0.0
    assert alpha_for(plan, 0, "error_rate", 1, final=True) == pytest.approx(0.1 * 2 / 3 / 5)


def test_the_plan_refuses_what_it_cannot_spend() -> None:
    with pytest.raises(ValueError, match=r"canary\.confidence"):
        SpendingPlan.for_policy([100], 1.0)
    with pytest.raises(ValueError, match="step 4 does not exist"):
        SpendingPlan.for_policy([50, 100], 0.95).step_alpha(4)


# ------------------------------------------------------------------ judge_window

POLICY = CanarySpec(steps=[10, 50, 100], min_requests=200)
PLAN = SpendingPlan.for_policy(POLICY.steps, 0.95)


def _sample(
    requests: int, *, errors: int = 0, factor: float = 1.0, labelled: int = 0, correct: int = 0
) -> VariantSample:
    rng = _rng(requests)
    shares = {str(c): requests // 10 for c in range(10)}
    return VariantSample(requests, errors, _jittered(rng, requests, factor), shares, labelled, correct)


def test_a_window_passes_when_every_check_passes_and_labels_are_optional() -> None:
    verdict = judge_window(_sample(200), _sample(1800), POLICY, PLAN, 0)
    assert verdict.outcome is PASS
    assert [c.check for c in verdict.checks] == list(CHECKS)
    accuracy = verdict.check("accuracy")
    assert accuracy is not None and accuracy.outcome is NOT_YET


def test_a_window_fails_on_any_failed_check_and_says_which() -> None:
    verdict = judge_window(_sample(200, errors=20), _sample(1800), POLICY, PLAN, 0)
    assert verdict.outcome is FAIL
    assert "error_rate" in verdict.reason


def test_a_short_window_waits_then_fails_closed_at_the_deadline() -> None:
    assert judge_window(_sample(50), _sample(450), POLICY, PLAN, 0).outcome is NOT_YET
    closed = judge_window(_sample(50), _sample(450), POLICY, PLAN, 0, at_deadline=True)
    assert closed.outcome is FAIL
    assert "deadline" in closed.reason


def test_required_labels_keep_a_window_open() -> None:
    assert judge_window(_sample(200), _sample(1800), POLICY, PLAN, 0, labels_required=True).outcome is NOT_YET


def test_at_100_percent_only_the_absolute_checks_run() -> None:
    verdict = judge_window(
        _sample(200, labelled=200, correct=190), _sample(0, labelled=900, correct=855), POLICY, PLAN, 2
    )
    assert [c.check for c in verdict.checks] == ["error_rate", "accuracy"]
    assert verdict.outcome is PASS


# ------------------------------------------------------------------ power at validation


def test_window_sizes_follow_the_step_share() -> None:
    assert window_sizes(200, 10) == (200, 1800)
    assert window_sizes(200, 50) == (200, 200)
    assert window_sizes(200, 80) == (800, 200)
    assert window_sizes(200, 100) == (200, None)


def test_the_default_policy_is_sound() -> None:
    assert power_problems(CanarySpec(), confidence=0.95, classes=10) == []
    figures = canary_power(CanarySpec(), confidence=0.95, classes=10)
    drift = next(f for f in figures if f.check == "prediction_drift" and f.step == 0)
    assert drift.detectable is not None and drift.detectable < 0.25


def test_the_issue_policy_is_refused_with_the_sample_size_that_would_do() -> None:
    policy = CanarySpec(steps=[20, 50, 100], min_requests=30, max_latency_p99_ratio=1.5)
    problems = power_problems(policy, confidence=0.95, classes=10)
    assert any(p.startswith("canary.min_requests: 30 is too few for canary.max_prediction_psi 0.2") for p in problems)
    drift = max(
        (f for f in canary_power(policy, confidence=0.95, classes=10) if f.check == "prediction_drift"),
        key=lambda f: f.min_samples,
    )
    assert f"use at least {drift.min_samples}" in drift.message
    fixed = policy.model_copy(update={"min_requests": drift.min_samples})
    assert power_problems(fixed, confidence=0.95, classes=10, checks=("prediction_drift",)) == []
    short = policy.model_copy(update={"min_requests": drift.min_samples - 1})
    assert power_problems(short, confidence=0.95, classes=10, checks=("prediction_drift",)) != []


def test_power_refuses_a_single_class() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        canary_power(CanarySpec(), confidence=0.95, classes=1)
