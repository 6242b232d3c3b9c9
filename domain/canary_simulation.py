"""Synthetic canary rollouts from known distributions: the proof that the canary's error rates hold.

Pure and seeded (`random.Random`), so `tests/domain/test_canary_simulation.py` asserts the rates
in seconds and `bench/canary_power.py` prints the same table next to today's point-estimate rules.

A `VariantModel` is how one model behaves on live traffic: error rate; latency (log-normal around
`median_ms`, times `slowdown`, plus `extra_ms`, with `jitter_share` of requests delayed by 1-5 ms as
a busy scheduler does); predicted-class shares; accuracy on labelled requests. A `Scenario` pairs
a champion with a canary, says whether the canary is bad (should be rolled back) and what the
gate measured as their disagreement. `SCENARIOS` holds the issue's cases.

`simulate_rollout` walks one rollout through the policy's steps: each analysed window holds the
step's planned sample (`domain.canary_power.window_sizes`), labels are pooled over the rollout
(every served request gets its delayed label), a failed window counts a failure (rollback at
`failure_limit`, else the step is repeated) and a passed one advances. The judge is a parameter,
so old and new rules see the same windows.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from domain.canary import CanaryAction, CanaryWindow, RolloutProgress, next_canary_step
from domain.canary_power import window_sizes
from domain.canary_stats import VariantSample
from domain.evidence import CheckOutcome, VariantWindow
from domain.histogram import LatencyHistogram, bucket_index
from domain.spec import CanarySpec

CLASSES = 10
_UNIFORM = (1.0 / CLASSES,) * CLASSES
_LATENCY_TABLE_DRAWS = 100_000


@dataclass(frozen=True, slots=True)
class VariantModel:
    error_rate: float = 0.002
    median_ms: float = 2.0
    spread: float = 0.25  # sigma of log latency
    slowdown: float = 1.0
    extra_ms: float = 0.0
    jitter_share: float = 0.02
    class_shares: tuple[float, ...] = _UNIFORM
    accuracy: float = 0.95


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    canary: VariantModel
    bad: bool
    champion: VariantModel = VariantModel()
    expected_disagreement: float | None = None


def _shifted_shares(moved: float) -> tuple[float, ...]:
    """Uniform shares with `moved` of the mass taken from class 0 and given to class 1."""
    shares = list(_UNIFORM)
    shares[0] -= moved
    shares[1] += moved
    return tuple(shares)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("equal", VariantModel(), bad=False),
    # A better model: 2 points more accurate, 5 % of predictions changed (the gate saw 6 % disagree).
    Scenario(
        "better", VariantModel(accuracy=0.97, class_shares=_shifted_shares(0.05)), False, expected_disagreement=0.06
    ),
    Scenario("errors_10pct", VariantModel(error_rate=0.10), bad=True),
    Scenario("latency_2x", VariantModel(slowdown=2.0), bad=True),
    Scenario("slower_30ms", VariantModel(extra_ms=30.0), bad=True),
    Scenario("collapsed", VariantModel(class_shares=(1.0,) + (0.0,) * (CLASSES - 1)), bad=True),
    Scenario("accuracy_minus_10", VariantModel(accuracy=0.85), bad=True),
)


@functools.cache
def _latency_table(model: VariantModel) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(bucket indices, cumulative weights) of the model's latency law, from a fixed large draw."""
    rng = random.Random(_LATENCY_TABLE_DRAWS)  # noqa: S311 - a simulation, not a secret
    counts: Counter[int] = Counter()
    for _ in range(_LATENCY_TABLE_DRAWS):
        ms = rng.lognormvariate(0.0, model.spread) * model.median_ms
        if rng.random() < model.jitter_share:
            ms += rng.uniform(1.0, 5.0)
        counts[bucket_index(ms * model.slowdown + model.extra_ms)] += 1
    indices = tuple(sorted(counts))
    cumulative, running = [], 0.0
    for index in indices:
        running += counts[index]
        cumulative.append(running)
    return indices, tuple(cumulative)


def _binomial(rng: random.Random, n: int, p: float) -> int:
    draw = rng.random
    return sum(1 for _ in range(n) if draw() < p)


def draw_window(model: VariantModel, requests: int, rng: random.Random) -> VariantSample:
    """One variant's window of `requests` requests, each labelled."""
    errors = _binomial(rng, requests, model.error_rate)
    indices, cumulative = _latency_table(model)
    latency = Counter(rng.choices(indices, cum_weights=cumulative, k=requests))
    served = requests - errors
    classes = Counter(str(c) for c in rng.choices(range(len(model.class_shares)), model.class_shares, k=served))
    return VariantSample(
        requests=requests,
        errors=errors,
        latency=LatencyHistogram(counts=dict(latency)),
        class_counts=dict(classes),
        labelled=served,
        correct=_binomial(rng, served, model.accuracy),
    )


Judge = Callable[[VariantSample, VariantSample, int], tuple[CheckOutcome, tuple[str, ...]]]


_OUTCOME = {
    CanaryAction.ROLLBACK: CheckOutcome.FAIL,
    CanaryAction.REPEAT: CheckOutcome.FAIL,
    CanaryAction.ADVANCE: CheckOutcome.PASS,
    CanaryAction.PROMOTE: CheckOutcome.PASS,
    CanaryAction.WAIT: CheckOutcome.NOT_YET,
}


def statistical_judge(policy: CanarySpec, expected_disagreement: float | None) -> Judge:
    """The controller's own decision (`domain.canary.next_canary_step`) on each window at the end of
    its interval, as a `Judge` (outcome, failed check names): what is proven is what ships."""

    def window(sample: VariantSample) -> VariantWindow:
        counts = {name: getattr(sample, name) for name in ("requests", "errors", "labelled", "correct")}
        return VariantWindow(**counts, latency_histogram=sample.latency, class_counts=dict(sample.class_counts))

    def judge(canary: VariantSample, champion: VariantSample, step: int) -> tuple[CheckOutcome, tuple[str, ...]]:
        observed = CanaryWindow(window(canary), window(champion), policy.interval_seconds)
        expected = expected_disagreement
        decision = next_canary_step(RolloutProgress(step), observed, policy, expected_disagreement=expected)
        failed = tuple(c.check for c in decision.evidence if c.outcome is CheckOutcome.FAIL)
        return _OUTCOME[decision.action], failed

    return judge


@dataclass(frozen=True, slots=True)
class RolloutResult:
    rolled_back: bool
    windows: int  # analysed windows until the decision
    failed_checks: tuple[str, ...]  # of the window that rolled it back


def simulate_rollout(scenario: Scenario, policy: CanarySpec, judge: Judge, rng: random.Random) -> RolloutResult:
    """One rollout of `scenario` under `policy` (see the module docstring)."""
    labels = {"canary": (0, 0), "champion": (0, 0)}
    step, failures, windows = 0, 0, 0
    while True:
        windows += 1
        n, m = window_sizes(policy.min_requests, policy.steps[step])
        drawn = {
            "canary": draw_window(scenario.canary, n, rng),
            "champion": draw_window(scenario.champion, m or 0, rng),
        }
        for name, sample in drawn.items():
            labelled, correct = labels[name]
            labels[name] = labelled + sample.labelled, correct + sample.correct
            drawn[name] = replace(sample, labelled=labels[name][0], correct=labels[name][1])
        outcome, failed = judge(drawn["canary"], drawn["champion"], step)
        if outcome is CheckOutcome.FAIL:
            failures += 1
            if failures >= policy.failure_limit:
                return RolloutResult(True, windows, failed)
            continue
        if outcome is CheckOutcome.NOT_YET:
            raise AssertionError(f"a window at its planned sample stayed undecided: {failed}")
        if step == len(policy.steps) - 1:
            return RolloutResult(False, windows, ())
        step += 1


@dataclass(frozen=True, slots=True)
class Rates:
    rollouts: int
    rolled_back: float  # share of rollouts rolled back at all
    by_second_window: float  # share rolled back by the second analysed window


def rollout_rates(scenario: Scenario, policy: CanarySpec, judge: Judge, rollouts: int, seed: int) -> Rates:
    rng = random.Random(seed)  # noqa: S311 - a simulation, not a secret
    results = [simulate_rollout(scenario, policy, judge, rng) for _ in range(rollouts)]
    back = sum(r.rolled_back for r in results)
    early = sum(r.rolled_back and r.windows <= 2 for r in results)
    return Rates(rollouts, back / rollouts, early / rollouts)
