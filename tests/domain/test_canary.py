"""next_canary_step: pure decisions on one window of live traffic, each check a statistical test
(the tests themselves: tests/domain/test_canary_stats.py; their error rates: test_canary_simulation.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from domain import entities as e
from domain.canary import (
    CanaryAction,
    CanaryWindow,
    RolloutProgress,
    VariantWindow,
    next_canary_step,
    population_stability_index,
)
from domain.evidence import CheckOutcome
from domain.histogram import LatencyHistogram
from domain.spec import CanarySpec

POLICY = CanarySpec(
    steps=[10, 50, 100],
    interval_seconds=30,
    min_requests=200,
    max_error_rate=0.01,
    max_latency_p99_ratio=1.2,
    failure_limit=1,
    min_labels=50,
)
CLASSES = {"0": 100, "1": 100, "2": 100}


def latencies(requests: int, typical_ms: float) -> LatencyHistogram:
    """`requests` latencies spread evenly over typical_ms x [0.8, 1.2]."""
    return LatencyHistogram.of(typical_ms * (0.8 + 0.4 * i / max(requests - 1, 1)) for i in range(requests))


def variant(
    requests: int, errors: int, typical_ms: float, classes: dict[str, int], labelled: int = 0, correct: int = 0
) -> VariantWindow:
    histogram = latencies(requests, typical_ms)
    return VariantWindow(
        requests=requests,
        errors=errors,
        latency_p99_ms=histogram.quantile(0.99),
        latency_histogram=histogram,
        class_counts=classes,
        labelled=labelled,
        correct=correct,
    )


def window(
    requests: int = 300,
    errors: int = 0,
    p99: float = 5.0,
    classes: dict[str, int] | None = None,
    elapsed: float = 31,
    labelled: int = 0,
    correct: int = 0,
) -> CanaryWindow:
    champion = variant(3000, 3, 5.0, {k: v * 10 for k, v in CLASSES.items()}, 100, 95)
    canary = variant(requests, errors, p99, classes or CLASSES, labelled, correct)
    return CanaryWindow(canary, champion, elapsed)


def test_a_good_canary_walks_every_step_and_is_promoted() -> None:
    state = RolloutProgress(0)
    seen = []
    for _ in range(3):
        step = next_canary_step(state, window(), POLICY)
        seen.append((step.action, step.traffic_percent))
        state = RolloutProgress(step.step_index, step.failures)
        assert {c.outcome for c in step.evidence if c.check != "accuracy"} == {CheckOutcome.PASS}
    assert seen == [(CanaryAction.ADVANCE, 50), (CanaryAction.ADVANCE, 100), (CanaryAction.PROMOTE, 100)]


@pytest.mark.parametrize(
    ("canary", "check"),
    [
        ({"errors": 30}, "error_rate"),
        ({"p99": 15.0}, "latency"),
        ({"classes": {"0": 280, "1": 10, "2": 10}}, "prediction_drift"),
        ({"labelled": 100, "correct": 70}, "accuracy"),
    ],
)
def test_a_bad_canary_is_rolled_back_at_the_first_analysed_step(canary: dict[str, object], check: str) -> None:
    step = next_canary_step(RolloutProgress(0), window(**canary), POLICY)  # type: ignore[arg-type]
    assert step.action is CanaryAction.ROLLBACK and step.traffic_percent == 0.0
    assert check in step.reason
    failed = next(c for c in step.evidence if c.check == check)
    assert failed.outcome is CheckOutcome.FAIL and failed.alpha > 0 and failed.canary_n > 0
    assert any(c.metric == check and c.verdict.value == "fail" for c in step.checks)  # the flat shape too


def test_each_check_stores_its_evidence_and_spends_the_plans_level() -> None:
    step = next_canary_step(RolloutProgress(0), window(), POLICY)
    by_check = {c.check: c for c in step.evidence}
    assert set(by_check) == {"error_rate", "error_rate_vs_champion", "latency", "prediction_drift", "accuracy"}
    # step 1 of 3 gets 3/6 of alpha = 0.05, split over its five checks
    assert by_check["error_rate"].alpha == pytest.approx(0.05 * 3 / 6 / 5)
    assert by_check["error_rate"].interval is not None and by_check["error_rate"].p_value is not None
    assert by_check["latency"].champion_n == 3000 and by_check["latency"].canary_n == 300
    assert by_check["accuracy"].outcome is CheckOutcome.NOT_YET  # no labels: optional feedback, never a pass


def test_the_gates_disagreement_keeps_a_better_models_expected_change_from_being_called_drift() -> None:
    changed = {"0": 200, "1": 50, "2": 50}  # a third of the predictions moved from classes 1, 2 to 0: PSI 0.46
    drifting = next_canary_step(RolloutProgress(0), window(classes=changed), POLICY)
    assert drifting.action is CanaryAction.ROLLBACK and "prediction_drift" in drifting.reason
    expected = next_canary_step(RolloutProgress(0), window(classes=changed), POLICY, expected_disagreement=0.4)
    assert expected.action is CanaryAction.ADVANCE, expected.reason
    drift = next(c for c in expected.evidence if c.check == "prediction_drift")
    assert drift.measures["expected_disagreement"] == 0.4


def test_no_traffic_extends_the_step_then_fails_closed_at_the_deadline() -> None:
    waiting = next_canary_step(RolloutProgress(1), window(requests=20, elapsed=60), POLICY)
    assert waiting.action is CanaryAction.WAIT and "20/200 canary" in waiting.reason
    assert all(c.outcome is CheckOutcome.NOT_YET for c in waiting.evidence)  # never a pass on too little data
    step = next_canary_step(RolloutProgress(1), window(requests=20, elapsed=91), POLICY)
    assert step.action is CanaryAction.ROLLBACK and "no evidence" in step.reason


def test_the_interval_must_pass_before_judging() -> None:
    assert next_canary_step(RolloutProgress(0), window(errors=100, elapsed=10), POLICY).action is CanaryAction.WAIT


def test_failures_below_the_limit_repeat_the_step() -> None:
    lenient = POLICY.model_copy(update={"failure_limit": 2})
    first = next_canary_step(RolloutProgress(0), window(errors=30), lenient)
    assert (first.action, first.failures, first.step_index) == (CanaryAction.REPEAT, 1, 0)
    second = next_canary_step(RolloutProgress(0, first.failures), window(errors=30), lenient)
    assert second.action is CanaryAction.ROLLBACK


def test_a_few_errors_within_the_noise_of_the_limit_do_not_fail_a_step() -> None:
    """3 errors in 300 requests is 1 %, exactly the limit: a point comparison at 1.01 % would fail on
    one more error; the exact test fails only when the rate is significantly above the limit."""
    champion = variant(3000, 30, 5.0, {k: v * 10 for k, v in CLASSES.items()})  # as often wrong, in the same window
    step = next_canary_step(RolloutProgress(0), CanaryWindow(variant(300, 4, 5.0, CLASSES), champion, 31), POLICY)
    assert step.action is CanaryAction.ADVANCE, step.reason
    # the same 4 errors against a champion that erred 10 times less often: significantly worse
    assert next_canary_step(RolloutProgress(0), window(errors=4), POLICY).action is CanaryAction.ROLLBACK


_STATUS_AFTER = {CanaryAction.PROMOTE: e.RolloutStatus.PROMOTED, CanaryAction.ROLLBACK: e.RolloutStatus.ROLLED_BACK}


@pytest.mark.parametrize(
    ("state", "observed"),
    [
        (RolloutProgress(0), window()),  # advance
        (RolloutProgress(1), window()),  # advance to the last step
        (RolloutProgress(2), window()),  # promote
        (RolloutProgress(5), window()),  # a stored step past the plan is the last one: promote
        (RolloutProgress(1), window(errors=30)),  # rollback
        (RolloutProgress(1), window(elapsed=10)),  # wait
    ],
)
def test_each_decision_stores_the_share_the_rollout_then_serves(state: RolloutProgress, observed: CanaryWindow) -> None:
    """The attempt's stored traffic_percent and the model server's weight after the decision are one value."""
    decision = next_canary_step(state, observed, POLICY)
    status = _STATUS_AFTER.get(decision.action, e.RolloutStatus.ACTIVE)
    after = e.Rollout(
        1, "p", None, 2, 1, status, decision.step_index, POLICY.model_dump(), None, datetime.now(UTC), None
    )
    assert decision.traffic_percent == after.traffic_percent == POLICY.traffic_percent(decision.step_index, status)


def test_psi_is_zero_for_identical_and_large_for_shifted_distributions() -> None:
    assert population_stability_index(CLASSES, CLASSES) == pytest.approx(0.0)
    assert population_stability_index(CLASSES, {"0": 290, "1": 5, "2": 5}) > 1.0


def test_at_100_percent_the_comparisons_are_not_tested_on_late_champion_requests() -> None:
    """At 100 % the champion sees only a few late requests: its latency and class mix mean nothing (CI
    once rolled a good candidate back on PSI 7.2 against them), so the last step tests only the
    absolute error limit and accuracy."""
    few = variant(4, 0, 1.0, {"0": 4})
    slow_and_skewed = variant(300, 0, 50.0, {"0": 100, "1": 100, "2": 100})
    step = next_canary_step(RolloutProgress(2), CanaryWindow(slow_and_skewed, few, 31), POLICY)
    assert step.action is CanaryAction.PROMOTE, step.reason
    assert {c.check for c in step.evidence} == {"error_rate", "accuracy"}


def test_below_100_percent_a_step_waits_for_enough_champion_requests_then_fails_closed() -> None:
    """At 50 % the champion may be just short of min_requests when the canary reaches it: the step
    waits rather than be judged without its comparisons, and fails closed at the deadline."""
    slow_and_skewed = variant(210, 0, 500.0, {"0": 210})
    short = variant(190, 0, 5.0, CLASSES)
    step = next_canary_step(RolloutProgress(1), CanaryWindow(slow_and_skewed, short, 31), POLICY)
    assert step.action is CanaryAction.WAIT and "190/200 champion" in step.reason
    step = next_canary_step(RolloutProgress(1), CanaryWindow(slow_and_skewed, short, 91), POLICY)
    assert step.action is CanaryAction.ROLLBACK and "no evidence" in step.reason
    enough = variant(200, 0, 5.0, CLASSES)
    step = next_canary_step(RolloutProgress(1), CanaryWindow(slow_and_skewed, enough, 31), POLICY)
    assert step.action is CanaryAction.ROLLBACK
    assert {c.check for c in step.evidence if c.outcome is CheckOutcome.FAIL} == {"latency", "prediction_drift"}


def test_latency_slack_forgives_a_large_ratio_of_a_few_milliseconds_only() -> None:
    policy = POLICY.model_copy(update={"latency_p99_slack_ms": 10.0})
    jitter = next_canary_step(RolloutProgress(0), window(p99=12.0), policy)  # 2.4x of 5 ms, 7 ms slower
    assert jitter.action is CanaryAction.ADVANCE, jitter.reason
    slow = next_canary_step(RolloutProgress(0), window(p99=50.0), policy)  # 10x, 45 ms slower
    assert slow.action is CanaryAction.ROLLBACK
    assert next_canary_step(RolloutProgress(0), window(p99=12.0), POLICY).action is CanaryAction.ROLLBACK  # no slack
