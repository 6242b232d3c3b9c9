"""next_canary_step: pure decisions on one window of live traffic."""

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


def variant(
    requests: int, errors: int, p99: float, classes: dict[str, int], labelled: int = 0, correct: int = 0
) -> VariantWindow:
    return VariantWindow(
        requests=requests,
        errors=errors,
        latency_p99_ms=p99,
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
    assert seen == [(CanaryAction.ADVANCE, 50), (CanaryAction.ADVANCE, 100), (CanaryAction.PROMOTE, 100)]


@pytest.mark.parametrize(
    ("canary", "metric"),
    [
        ({"errors": 30}, "error_rate"),
        ({"p99": 15.0}, "latency_p99_ratio"),
        ({"classes": {"0": 280, "1": 10, "2": 10}}, "prediction_psi"),
        ({"labelled": 100, "correct": 70}, "accuracy"),
    ],
)
def test_a_bad_canary_is_rolled_back_at_the_first_analysed_step(canary: dict[str, object], metric: str) -> None:
    step = next_canary_step(RolloutProgress(0), window(**canary), POLICY)  # type: ignore[arg-type]
    assert step.action is CanaryAction.ROLLBACK and step.traffic_percent == 0.0
    assert metric in step.reason
    assert any(c.metric == metric and c.verdict.value == "fail" for c in step.checks)


def test_no_traffic_extends_the_step_then_fails_closed_at_the_deadline() -> None:
    assert next_canary_step(RolloutProgress(1), window(requests=20, elapsed=60), POLICY).action is CanaryAction.WAIT
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


def test_at_100_percent_the_comparisons_are_skipped_not_judged_on_late_champion_requests() -> None:
    """At 100 % the champion sees only a few late requests: its p99 and class mix mean nothing (CI once
    rolled a good candidate back on PSI 7.2 against them), so the last step skips the comparisons."""
    few = variant(4, 0, 1.0, {"0": 4})
    slow_and_skewed = variant(300, 0, 50.0, {"0": 100, "1": 100, "2": 100})
    step = next_canary_step(RolloutProgress(2), CanaryWindow(slow_and_skewed, few, 31), POLICY)
    assert step.action is CanaryAction.PROMOTE
    skipped = {c.metric: c.reason for c in step.checks if c.verdict.value == "skipped"}
    assert set(skipped) >= {"latency_p99_ratio", "prediction_psi"}
    assert "at 100 %" in skipped["prediction_psi"] and "4 in this window" in skipped["prediction_psi"]


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
    assert {c.metric for c in step.checks if c.verdict.value == "fail"} == {"latency_p99_ratio", "prediction_psi"}


def test_latency_slack_forgives_a_large_ratio_of_a_few_milliseconds_only() -> None:
    policy = POLICY.model_copy(update={"latency_p99_slack_ms": 10.0})
    jitter = next_canary_step(RolloutProgress(0), window(p99=12.0), policy)  # 2.4x of 5 ms, 7 ms slower
    check = next(c for c in jitter.checks if c.metric == "latency_p99_ratio")
    assert jitter.action is CanaryAction.ADVANCE and "only 7.0 ms slower (slack 10 ms)" in check.reason
    slow = next_canary_step(RolloutProgress(0), window(p99=50.0), policy)  # 10x, 45 ms slower
    assert slow.action is CanaryAction.ROLLBACK
    assert next_canary_step(RolloutProgress(0), window(p99=12.0), POLICY).action is CanaryAction.ROLLBACK  # no slack
