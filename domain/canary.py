"""The canary step decision: `next_canary_step(state, window, policy) -> CanaryStep`.

Pure: the controller measures one window of live traffic per variant (same interval for both),
this decides. Checks, each with its numbers and a reason:
- error rate of the canary <= `max_error_rate`;
- p99 latency ratio canary / champion in the same window <= `max_latency_p99_ratio` (or the canary
  at most `latency_p99_slack_ms` slower: on a p99 of a few ms, jitter alone moves the ratio);
- prediction drift: population stability index of the predicted-class distributions
  <= `max_prediction_psi`;
  (both compare with the champion: below 100 % a step waits for `min_requests` champion requests
  too; at 100 % they are skipped and the last step is judged on the other checks)
- accuracy from delayed labels, once both variants have `min_labels`: canary >= champion -
  `max_accuracy_drop`.
Never pass on no data: a step with fewer than `min_requests` canary requests waits (is extended)
up to `step_deadline_factor` intervals, then fails closed. A failed check counts a failure; at
`failure_limit` the rollout is rolled back, else the step is repeated with a fresh window. All
checks passing advances to the next step, and passing the last (100 %) step promotes.
"""

from __future__ import annotations

from dataclasses import dataclass

from domain.canary_stats import population_stability
from domain.evidence import CanaryAction, VariantWindow
from domain.outcomes import GateCheck, RolloutStatus, Verdict
from domain.spec import CanarySpec

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


def population_stability_index(expected: dict[str, int], actual: dict[str, int]) -> float:
    """PSI between two categorical distributions (0: identical; > 0.2 is commonly read as a shift);
    the one formula lives in `domain.canary_stats`."""
    return population_stability(expected, actual)


def next_canary_step(state: RolloutProgress, window: CanaryWindow, policy: CanarySpec) -> CanaryStep:
    current = policy.traffic_percent(state.step_index)
    canary = window.canary

    def stay(
        action: CanaryAction, reason: str, checks: tuple[GateCheck, ...] = (), failures: int | None = None
    ) -> CanaryStep:
        return CanaryStep(
            action, state.step_index, current, state.failures if failures is None else failures, reason, checks
        )

    rolled_back = policy.traffic_percent(state.step_index, RolloutStatus.ROLLED_BACK)
    if window.elapsed_seconds < policy.interval_seconds:
        return stay(CanaryAction.WAIT, f"step {state.step_index + 1} at {current:g} %: interval not over yet")
    # Below 100 % the champion still serves its share, and the comparisons need it: the window must
    # hold min_requests of each. At 100 % the champion only gets requests already on their way.
    compares = current < 100.0
    short = [f"{canary.requests}/{policy.min_requests} canary"] if canary.requests < policy.min_requests else []
    if compares and window.champion.requests < policy.min_requests:
        short.append(f"{window.champion.requests}/{policy.min_requests} champion")
    if short:
        deadline = policy.interval_seconds * policy.step_deadline_factor
        if window.elapsed_seconds < deadline:
            return stay(
                CanaryAction.WAIT,
                f"only {' and '.join(short)} requests: step extended (deadline {deadline:g} s)",
            )
        reason = (
            f"no evidence: {' and '.join(short)} requests by the {deadline:g} s deadline; "
            "rolled back (never pass on no data)"
        )
        return CanaryStep(CanaryAction.ROLLBACK, state.step_index, rolled_back, state.failures + 1, reason)

    checks = _checks(window, policy, compares)
    failed = [c for c in checks if c.verdict is Verdict.FAIL]
    if failed:
        failures = state.failures + 1
        why = "; ".join(f"{c.metric}: {c.reason}" for c in failed)
        if failures >= policy.failure_limit:
            return CanaryStep(
                CanaryAction.ROLLBACK,
                state.step_index,
                rolled_back,
                failures,
                f"rolled back at {current:g} % ({failures}/{policy.failure_limit} failures): {why}",
                tuple(checks),
            )
        return stay(CanaryAction.REPEAT, f"failure {failures}/{policy.failure_limit}: {why}", tuple(checks), failures)
    if policy.is_last_step(state.step_index):
        return CanaryStep(
            CanaryAction.PROMOTE,
            state.step_index,
            policy.traffic_percent(state.step_index, RolloutStatus.PROMOTED),
            state.failures,
            f"every step passed up to {current:g} %: promote",
            tuple(checks),
        )
    nxt = state.step_index + 1
    return CanaryStep(
        CanaryAction.ADVANCE,
        nxt,
        policy.traffic_percent(nxt),
        state.failures,
        f"step {state.step_index + 1} at {current:g} % passed: on to {policy.traffic_percent(nxt):g} %",
        tuple(checks),
    )


def _checks(window: CanaryWindow, policy: CanarySpec, compares: bool) -> list[GateCheck]:
    canary, champion = window.canary, window.champion
    error_rate = canary.errors / canary.requests
    ok = error_rate <= policy.max_error_rate
    checks = [
        _judged(
            "error_rate",
            ok,
            f"{error_rate:.4f} {'<=' if ok else '>'} {policy.max_error_rate:.4f}",
            (error_rate, champion.error_rate, policy.max_error_rate),
        )
    ]
    uncomparable = (
        None
        if compares
        else f"at 100 % the champion only serves requests already on their way ({champion.requests} in this "
        "window): nothing to compare with"
    )
    if uncomparable is None and canary.latency_p99_ms is not None and champion.latency_p99_ms:
        ratio = canary.latency_p99_ms / champion.latency_p99_ms
        within = ratio <= policy.max_latency_p99_ratio
        slower_ms = canary.latency_p99_ms - champion.latency_p99_ms
        reason = f"canary/champion p99 = {ratio:.2f} {'<=' if within else '>'} {policy.max_latency_p99_ratio:.2f}"
        if not within and slower_ms <= policy.latency_p99_slack_ms:
            reason += f", but only {slower_ms:.1f} ms slower (slack {policy.latency_p99_slack_ms:g} ms)"
        values = (canary.latency_p99_ms, champion.latency_p99_ms, policy.max_latency_p99_ratio)
        checks.append(_judged("latency_p99_ratio", within or slower_ms <= policy.latency_p99_slack_ms, reason, values))
    else:
        checks.append(_skipped("latency_p99_ratio", uncomparable or "no latency measured in this window"))
    if uncomparable is None and canary.class_counts and champion.class_counts:
        psi = population_stability_index(champion.class_counts, canary.class_counts)
        ok = psi <= policy.max_prediction_psi
        reason = f"PSI {psi:.3f} {'<=' if ok else '>'} {policy.max_prediction_psi:.3f}"
        checks.append(_judged("prediction_psi", ok, reason, (psi, None, policy.max_prediction_psi)))
    else:
        checks.append(_skipped("prediction_psi", uncomparable or "no predicted classes in this window"))
    if (
        canary.accuracy is not None
        and champion.accuracy is not None
        and min(canary.labelled, champion.labelled) >= policy.min_labels
    ):
        ok = canary.accuracy >= champion.accuracy - policy.max_accuracy_drop
        reason = f"{canary.accuracy:.4f} vs champion {champion.accuracy:.4f} (max drop {policy.max_accuracy_drop:.4f})"
        checks.append(_judged("accuracy", ok, reason, (canary.accuracy, champion.accuracy, policy.max_accuracy_drop)))
    else:
        checks.append(
            _skipped(
                "accuracy",
                f"labels so far: canary {canary.labelled}, champion {champion.labelled} "
                f"(need {policy.min_labels} each)",
            )
        )
    return checks


def _judged(metric: str, ok: bool, reason: str, values: tuple[float | None, float | None, float | None]) -> GateCheck:
    """A pass or fail with its numbers: (canary value, champion value, threshold)."""
    return GateCheck(metric, "canary", Verdict.PASS if ok else Verdict.FAIL, reason, *values)


def _skipped(metric: str, reason: str) -> GateCheck:
    return GateCheck(metric, "canary", Verdict.SKIPPED, reason)
