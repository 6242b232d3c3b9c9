"""The canary step decision: `next_canary_step(state, window, policy) -> CanaryStep`.

Pure: the controller measures one window of live traffic per variant (same interval for both),
this decides, with the statistical checks of `domain/canary_stats.py` at the significance levels
of the rollout's spending plan (`domain/sequential.py`, from `canary.steps` and
`canary.confidence`):
- error rate: exact binomial test against `max_error_rate`, and Fisher's test against the champion's
  rate in the same window;
- latency: exceedance tests at the champion's median and p99 from both windows' histograms, with
  the allowed `max_latency_p99_ratio` and `latency_p99_slack_ms`;
- prediction drift: chi-square homogeneity of the predicted classes, failing only when significant,
  above `max_prediction_psi` AND beyond the disagreement the gate measured between candidate and
  champion on the same test rows (`expected_disagreement`);
- accuracy from delayed labels (once both variants have `min_labels`): non-inferiority with the
  `max_accuracy_drop` margin; for a regression pipeline (`task="regression"`) the mean absolute
  error from delayed labels instead (`mae`: non-inferiority with the relative `max_error_increase`
  margin), and prediction drift counts the champion's prediction bins instead of classes.
(Below 100 % the comparisons need the champion's `min_requests` too; at 100 % the champion serves
only requests already on their way, so only the error-rate limit and accuracy are tested.)

A window is judged once, when the interval is over and it holds `min_requests` per variant (the
planned sample: the whole level is spent on that look). Each check answers pass, fail or not yet;
"not yet" keeps the step collecting up to `step_deadline_factor` intervals, then fails closed (never
a pass on no data). A failed check counts a failure; at `failure_limit` the rollout is rolled back,
else the step is repeated with a fresh window. All checks passing advances to the next step, and
passing the last (100 %) step promotes.
"""

from __future__ import annotations

from dataclasses import dataclass

from domain.canary_stats import VariantSample, judge_window, population_stability
from domain.evidence import CanaryAction, CheckEvidence, CheckOutcome, VariantWindow
from domain.histogram import LatencyHistogram
from domain.outcomes import GateCheck, RolloutStatus
from domain.sequential import SpendingPlan
from domain.spec import CanarySpec
from domain.task import Task

__all__ = [
    "CanaryAction",
    "CanaryStep",
    "CanaryWindow",
    "RolloutProgress",
    "VariantWindow",
    "next_canary_step",
    "population_stability_index",
]


@dataclass(frozen=True, slots=True)
class CanaryWindow:
    canary: VariantWindow
    champion: VariantWindow
    elapsed_seconds: float


@dataclass(frozen=True, slots=True)
class RolloutProgress:
    step_index: int
    failures: int = 0


@dataclass(frozen=True, slots=True)
class CanaryStep:
    action: CanaryAction
    step_index: int  # the step to be at after this decision
    traffic_percent: float  # the canary's weight after this decision (`CanarySpec.traffic_percent`)
    failures: int
    reason: str
    checks: tuple[GateCheck, ...] = ()
    evidence: tuple[CheckEvidence, ...] = ()


# PSI between two categorical distributions (0: identical); the one formula lives in domain.canary_stats.
population_stability_index = population_stability


def next_canary_step(
    state: RolloutProgress,
    window: CanaryWindow,
    policy: CanarySpec,
    *,
    expected_disagreement: float | None = None,
    task: Task = "classification",
) -> CanaryStep:
    """The decision for the rollout's current step on this window.

    `expected_disagreement`: how often the candidate and the champion disagreed on the gate's test
    rows (None: not measured); live prediction drift within it is a better model's expected change
    (for regression: how often their predictions fell in different bins). `task`: the pipeline's,
    which decides the delayed-label check (accuracy, or regression's mae).
    """
    current = policy.traffic_percent(state.step_index)
    canary = window.canary
    rolled_back = policy.traffic_percent(state.step_index, RolloutStatus.ROLLED_BACK)
    if window.elapsed_seconds < policy.interval_seconds:
        return CanaryStep(
            CanaryAction.WAIT,
            state.step_index,
            current,
            state.failures,
            f"step {state.step_index + 1} at {current:g} %: interval not over yet",
        )
    deadline = policy.interval_seconds * policy.step_deadline_factor
    judgement = judge_window(
        _sample(canary),
        _sample(window.champion),
        policy,
        SpendingPlan.for_policy(policy.steps, policy.confidence, task=task),
        min(state.step_index, len(policy.steps) - 1),  # a stored step past the plan is its last
        expected_disagreement=expected_disagreement,
        at_deadline=window.elapsed_seconds >= deadline,
    )
    evidence = judgement.checks
    checks = tuple(c.to_gate_check() for c in evidence)

    def decided(action: CanaryAction, step_index: int, percent: float, failures: int, reason: str) -> CanaryStep:
        return CanaryStep(action, step_index, percent, failures, reason, checks, evidence)

    if judgement.outcome is CheckOutcome.NOT_YET:
        return decided(
            CanaryAction.WAIT,
            state.step_index,
            current,
            state.failures,
            f"{_shortfall(window, policy, current)}: step extended (deadline {deadline:g} s); {judgement.reason}",
        )
    if judgement.outcome is CheckOutcome.FAIL:
        if not any(c.outcome is CheckOutcome.FAIL for c in evidence):  # the deadline came first
            reason = (
                f"no evidence by the {deadline:g} s deadline ({_shortfall(window, policy, current)}); "
                f"rolled back (never pass on no data): {judgement.reason}"
            )
            return decided(CanaryAction.ROLLBACK, state.step_index, rolled_back, state.failures + 1, reason)
        failures = state.failures + 1
        why = judgement.reason
        if failures >= policy.failure_limit:
            reason = f"rolled back at {current:g} % ({failures}/{policy.failure_limit} failures): {why}"
            return decided(CanaryAction.ROLLBACK, state.step_index, rolled_back, failures, reason)
        reason = f"failure {failures}/{policy.failure_limit}: {why}"
        return decided(CanaryAction.REPEAT, state.step_index, current, failures, reason)
    if policy.is_last_step(state.step_index):
        promoted = policy.traffic_percent(state.step_index, RolloutStatus.PROMOTED)
        reason = f"every step passed up to {current:g} %: promote"
        return decided(CanaryAction.PROMOTE, state.step_index, promoted, state.failures, reason)
    nxt = state.step_index + 1
    reason = f"step {state.step_index + 1} at {current:g} % passed: on to {policy.traffic_percent(nxt):g} %"
    return decided(CanaryAction.ADVANCE, nxt, policy.traffic_percent(nxt), state.failures, reason)


def _sample(window: VariantWindow) -> VariantSample:
    return VariantSample(
        requests=window.requests,
        errors=window.errors,
        latency=window.latency_histogram or LatencyHistogram(),
        class_counts=window.class_counts,
        labelled=window.labelled,
        correct=window.correct,
        abs_error_sum=window.abs_error_sum,
        abs_error_sq_sum=window.abs_error_sq_sum,
    )


def _shortfall(window: CanaryWindow, policy: CanarySpec, percent: float) -> str:
    """What the window still lacks of its planned sample, in words."""
    short = []
    if window.canary.requests < policy.min_requests:
        short.append(f"{window.canary.requests}/{policy.min_requests} canary")
    # Below 100 % the comparisons need the champion's share too; at 100 % it only finishes requests in flight.
    if percent < 100.0 and window.champion.requests < policy.min_requests:
        short.append(f"{window.champion.requests}/{policy.min_requests} champion")
    return f"only {' and '.join(short)} requests" if short else "planned sample reached"
