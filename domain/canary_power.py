"""Power of a canary policy, for `retrainer pipelines validate`: is each threshold measurable?

For every step and every check the plan tests there (`domain/sequential.py`), `canary_power`
takes the window's sample sizes (`window_sizes`: `min_requests` canary requests and the champion's
share of that traffic; above 50 % the champion's `min_requests` is the binding one) and the level
the plan gives the check's final look, and returns a `CheckPower`:

- `detectable`: the smallest effect the check detects with probability equal to the configured
  confidence (95 % power at 0.95), in the units named by `detectable_unit`: an error rate; the
  fraction of canary requests above ratio x champion p99 + slack (the tail half of the latency
  check); a PSI; an accuracy drop (at `BASELINE_ACCURACY`). A planning figure (normal and Patnaik
  approximations), never a verdict.
- `sound`: the threshold lies outside the window's sampling noise, by one rule per check:
  - error_rate: the limit is no finer than one request (`min_requests x max_error_rate >= 1`):
    otherwise a single error already exceeds it and a perfect candidate cannot be told from one
    at the limit;
  - latency: both variants have at least one sample beyond the p99 (`n x 0.01 >= 1`): below that
    the "p99" of the window is its maximum;
  - prediction_drift: identical models would exceed `max_prediction_psi` in fewer than
    1 - confidence of windows: the PSI of two samples of one distribution over k classes is close
    to (1/n + 1/m) chi-square(k - 1), whose `confidence` quantile must stay below the limit
    (otherwise "PSI above the limit" is true of noise and the check degenerates into a pure
    significance test that calls any difference drift);
  - accuracy: the margin is no finer than one label (`min_labels x max_accuracy_drop >= 1`);
  (error_rate_vs_champion has no threshold of its own and is not listed.)
- `min_samples`: the smallest `min_requests` (`min_labels` for accuracy) that makes it sound.

`power_problems` turns the unsound ones into the validator's lines, one per check at its worst
step, e.g. `canary.min_requests: 30 is too few for canary.max_prediction_psi 0.2 at the 50 % step
(identical models exceed it in 96 % of windows); use at least 170`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from domain.canary_stats import LATENCY_QUANTILES
from domain.distributions import (
    binomial_sf,
    chi2_isf,
    chi2_sf,
    exceedance_sf,
    noncentral_chi2_sf,
    normal_quantile,
    smallest_count,
)
from domain.sequential import CheckName, SpendingPlan, alpha_for
from domain.spec import CanarySpec, PipelineSpec
from domain.task import Task

POWERED_CHECKS: tuple[CheckName, ...] = ("error_rate", "latency", "prediction_drift", "accuracy")
_TAIL = 0.01  # 1 - the p99's quantile
BASELINE_ACCURACY = 0.9  # the accuracy at which the detectable drop is computed (the variance is largest near 0.5)
_LARGEST_SAMPLE = 10**9


@dataclass(frozen=True, slots=True)
class CheckPower:
    check: CheckName
    step: int
    step_percent: float
    canary_n: int
    champion_n: int | None
    alpha: float
    threshold_key: str
    threshold: float
    detectable: float | None  # None: not detectable at this size at all
    detectable_unit: str
    sound: bool
    sample_key: str
    sample_value: int
    min_samples: int
    noise_note: str  # why the threshold is inside the noise (when it is)

    @property
    def message(self) -> str:
        """The validator's line for an unsound check (key path, the value, the fix)."""
        return (
            f"{self.sample_key}: {self.sample_value} is too few for {self.threshold_key} {self.threshold:g} "
            f"at the {self.step_percent:g} % step ({self.noise_note}); use at least {self.min_samples}"
        )


def window_sizes(min_requests: int, percent: float) -> tuple[int, int | None]:
    """(canary, champion) requests in a window that just reached `min_requests` on both sides.

    At 100 % the champion serves nothing new: None.
    """
    if percent >= 100.0:
        return min_requests, None
    champion_share = (100.0 - percent) / percent
    if champion_share >= 1.0:
        return min_requests, math.ceil(min_requests * champion_share)
    return math.ceil(min_requests / champion_share), min_requests


def _smallest_sound(sound: Callable[[int], bool]) -> int:
    """Smallest sample size in 1.._LARGEST_SAMPLE for a monotone `sound` (doubling, then bisection)."""
    high = 1
    while not sound(high):
        if high >= _LARGEST_SAMPLE:
            return _LARGEST_SAMPLE
        high *= 2
    low = high // 2 + 1 if high > 1 else 1
    while low < high:
        middle = (low + high) // 2
        if sound(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _bisect_rate(reaches: Callable[[float], bool], low: float = 0.0, high: float = 1.0) -> float | None:
    """Smallest rate in (low, high] with `reaches(rate)` (monotone); None when even `high` does not."""
    if not reaches(high):
        return None
    for _ in range(50):
        middle = (low + high) / 2
        if reaches(middle):
            high = middle
        else:
            low = middle
    return high


def _binomial_detectable(n: int, critical: int | None, power: float) -> float | None:
    if critical is None:
        return None
    return _bisect_rate(lambda rate: binomial_sf(critical, n, rate) >= power)


def _psi_noise(n: int, m: int, classes: int, confidence: float) -> float:
    return chi2_isf(1.0 - confidence, classes - 1) * (1.0 / n + 1.0 / m)


def canary_power(
    policy: CanarySpec, confidence: float, classes: int, plan: SpendingPlan | None = None, task: Task = "classification"
) -> tuple[CheckPower, ...]:
    """Each check's power at each step where the plan tests it (see the module docstring).

    `classes`: the number of predicted classes (or regression bins) the drift check compares. A
    regression plan tests `mae` where a classifier's tests accuracy; its power depends on the spread
    of the absolute errors, unknown before traffic, so it is not figured here.
    """
    if classes < 2:
        raise ValueError(f"prediction drift compares at least 2 classes or bins (got {classes})")
    plan = plan or SpendingPlan.for_policy(policy.steps, confidence, task=task)
    setting = _Setting(policy, confidence, confidence, classes, BASELINE_ACCURACY)
    results: list[CheckPower] = []
    for step, percent in enumerate(policy.steps):
        n, m = window_sizes(policy.min_requests, percent)
        for check in plan.checks_at(step):
            if check not in POWERED_CHECKS or (m is None and check in ("latency", "prediction_drift")):
                continue
            alpha = alpha_for(plan, step, check, 0, final=True)
            results.append(_check_power(check, setting, step, percent, (n, m), alpha))
    return tuple(results)


@dataclass(frozen=True, slots=True)
class _Setting:
    """What every check's power figure depends on besides its step."""

    policy: CanarySpec
    confidence: float
    power: float
    classes: int
    baseline_accuracy: float


@dataclass(frozen=True, slots=True)
class _Rule:
    """What differs between the checks' power figures."""

    threshold_key: str
    threshold: float
    detectable: float | None
    unit: str
    sound: bool
    min_samples: int
    noise_note: str


def _check_power(
    check: CheckName, setting: _Setting, step: int, percent: float, sizes: tuple[int, int | None], alpha: float
) -> CheckPower:
    policy = setting.policy
    if check == "accuracy":
        labels = policy.min_labels
        rule = _accuracy_rule(setting, alpha)
        sizes, sample = (labels, labels), ("canary.min_labels", labels)
    else:
        rule = _request_rule(check, setting, percent, sizes, alpha)
        sample = ("canary.min_requests", policy.min_requests)
    return CheckPower(
        check=check,
        step=step,
        step_percent=percent,
        canary_n=sizes[0],
        champion_n=sizes[1],
        alpha=alpha,
        threshold_key=rule.threshold_key,
        threshold=rule.threshold,
        detectable=rule.detectable,
        detectable_unit=rule.unit,
        sound=rule.sound,
        sample_key=sample[0],
        sample_value=sample[1],
        min_samples=rule.min_samples,
        noise_note=rule.noise_note,
    )


def _accuracy_rule(setting: _Setting, alpha: float) -> _Rule:
    baseline, labels = setting.baseline_accuracy, setting.policy.min_labels
    margin = setting.policy.max_accuracy_drop
    spread = math.sqrt(2 * baseline * (1 - baseline) / labels)
    detectable = margin + (normal_quantile(1 - alpha) + normal_quantile(setting.power)) * spread
    return _Rule(
        threshold_key="canary.max_accuracy_drop",
        threshold=margin,
        detectable=min(detectable, 1.0),
        unit=f"accuracy drop from {baseline:g}",
        sound=margin == 0 or labels * margin >= 1 - 1e-9,
        min_samples=1 if margin == 0 else math.ceil(1 / margin - 1e-9),
        noise_note=f"one label in {labels} is already {1 / labels:.3f}",
    )


def _request_rule(
    check: CheckName, setting: _Setting, percent: float, sizes: tuple[int, int | None], alpha: float
) -> _Rule:
    policy, power, classes = setting.policy, setting.power, setting.classes
    n, m = sizes
    if check == "error_rate":
        limit = policy.max_error_rate
        critical = smallest_count(n, lambda c: binomial_sf(c, n, limit), alpha) if limit < 1 else None
        return _Rule(
            threshold_key="canary.max_error_rate",
            threshold=limit,
            detectable=_binomial_detectable(n, critical, power),
            unit="error rate",
            sound=limit == 0 or n * limit >= 1 - 1e-9,
            min_samples=1 if limit == 0 else _smallest_sound(lambda k: _sizes(k, percent)[0] * limit >= 1 - 1e-9),
            noise_note=f"one error in {n} requests is already {1 / n:.3f}",
        )
    if m is None:
        raise ValueError(f"{check} compares with the champion, which serves nothing new at {percent:g} %")
    if check == "latency":
        # The p99 half of the latency check: its tail test runs at alpha / len(LATENCY_QUANTILES).
        rank = min(m, max(1, math.ceil((1 - _TAIL) * m)))
        tail_alpha = alpha / len(LATENCY_QUANTILES)
        critical = smallest_count(n, lambda e: exceedance_sf(e, n, m, rank), tail_alpha)
        return _Rule(
            threshold_key="canary.max_latency_p99_ratio",
            threshold=policy.max_latency_p99_ratio,
            detectable=_binomial_detectable(n, critical, power),
            unit="share of canary requests above ratio x champion p99 + slack",
            sound=min(n, m) * _TAIL >= 1 - 1e-9,
            min_samples=_smallest_sound(lambda k: min(_sizes(k, percent)) * _TAIL >= 1 - 1e-9),
            noise_note=f"the p99 of {min(n, m)} requests is their maximum",
        )
    limit = policy.max_prediction_psi
    critical_chi2 = chi2_isf(alpha, classes - 1)
    lam = _bisect_rate(lambda x: noncentral_chi2_sf(critical_chi2, classes - 1, x) >= power, 0.0, 1e7)
    exceed = chi2_sf(limit / (1.0 / n + 1.0 / m), classes - 1)
    return _Rule(
        threshold_key="canary.max_prediction_psi",
        threshold=limit,
        detectable=None if lam is None else lam * (1.0 / n + 1.0 / m),
        unit=f"PSI over {classes} classes",
        sound=_psi_noise(n, m, classes, setting.confidence) <= limit,
        min_samples=_smallest_sound(lambda k: _psi_noise(*_sizes(k, percent), classes, setting.confidence) <= limit),
        noise_note=f"identical models exceed it in {exceed * 100:.0f} % of windows",
    )


def _sizes(min_requests: int, percent: float) -> tuple[int, int]:
    n, m = window_sizes(min_requests, percent)
    return n, n if m is None else m


def power_problems(
    policy: CanarySpec,
    confidence: float,
    classes: int,
    checks: tuple[CheckName, ...] = POWERED_CHECKS,
    task: Task = "classification",
) -> list[str]:
    """One validator line per unsound check among `checks`, at the step that needs the most samples."""
    worst: dict[CheckName, CheckPower] = {}
    for result in canary_power(policy, confidence=confidence, classes=classes, task=task):
        if result.check in checks and not result.sound:
            known = worst.get(result.check)
            if known is None or result.min_samples > known.min_samples:
                worst[result.check] = result
    return [worst[c].message for c in checks if c in worst]


def spec_power_problems(spec: PipelineSpec) -> list[str]:
    """`power_problems` of a pipeline's canary policy at its confidence, over its model's classes (or a
    regression model's prediction bins)."""
    if spec.canary is None:
        return []
    return power_problems(
        spec.canary, confidence=spec.canary.confidence, classes=spec.prediction_categories, task=spec.task
    )
