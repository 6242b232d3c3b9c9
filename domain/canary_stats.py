"""Canary checks as statistical tests with three outcomes, and the judgement of one window.

Each check tests "the candidate is acceptable" at a significance level `alpha` that the rollout's
spending plan gives it (`domain/sequential.py`: `alpha_for(plan, step, check, look, final=…)`),
and returns a `CheckEvidence` (outcome, statistic, interval or p-value, sample sizes, threshold,
alpha, reason) that the controller stores with the analysed window.

Outcomes:
- `fail`: the data reject acceptability at `alpha` (so a good candidate fails with probability at
  most `alpha`; the plan makes the sum over a whole rollout at most 1 - confidence);
- `pass`: the check reached its planned sample (`final=True`: `min_requests` per variant, or
  `min_labels`) without failing, or the data already prove acceptability at `alpha` (error-rate
  upper bound below the limit; accuracy non-inferior beyond the margin). What a pass at the planned
  sample may miss is stated by the power computed at validation (`domain/canary_power.py`);
- `not_yet`: neither, or no data. The controller keeps collecting until the step's deadline and
  then fails closed (`judge_window(…, at_deadline=True)`): never a pass on no data.

The tests (each exact or a named approximation, functions in `domain/distributions.py`):
- `error_rate_check`: exact binomial test of H0 rate <= `max_error_rate` (fail: P(X >= errors) <=
  alpha, i.e. the Clopper-Pearson lower bound is above the limit; early pass: the upper bound is
  below it); the interval shown is Wilson's;
- `error_rate_vs_champion_check`: Fisher's exact test, one-sided: fails only if the canary errs
  significantly more often than the champion on the same window's traffic;
- `latency_check`: exact, distribution-free exceedance (precedence) tests at the champion's median
  and p99, each at alpha / 2. At quantile q: T = ratio x U + slack, U the upper edge of the bucket
  holding the champion's ceil(q m)-th smallest latency (its plug-in q-quantile); E = canary samples
  certainly above T. Under H0 "the canary's latency, less the slack and divided by the ratio, is
  no slower than the champion's", E is at most the exceedance count of exchangeable samples, whose
  law is exact (`exceedance_sf`), so jitter that both variants share (a few % of requests delayed)
  cannot make it fail more than alpha; bucketing only lowers E. So the allowed ratio holds for the
  body of the distribution as well as its tail: with 2 % of requests delayed by jitter, the p99 of
  a window is the jitter's, and a model twice as slow moves it so little that 200 requests (two of
  them beyond the p99) would miss it; its median moves by the full factor;
- `prediction_drift_check`: chi-square test of homogeneity of the two predicted-class (or
  regression-bin, see `binned_counts`) count vectors, failing only when the difference is
  significant AND its PSI exceeds `max_psi` AND, when the gate measured an expected disagreement d
  (how often candidate and champion disagree on the same test rows), the live divergence is
  significantly larger than d. Why d enters that way: on the same input distribution, the total
  variation distance between the two predicted-class distributions is at most the rate at which
  the two models disagree, so a better model that changes a fraction d of predictions moves the
  live distributions by at most d. The live divergence is tested through a simultaneous lower
  bound of the total variation (per-class Wald margins, Bonferroni over the classes);
- `accuracy_check`: non-inferiority of two proportions with margin `max_drop`, by Newcombe's
  hybrid score interval on canary - champion accuracy: fail when its upper bound is below
  -max_drop, early pass when its lower bound is above it.
- `mae_check` (regression, in accuracy's place): non-inferiority of the canary's mean absolute
  error on delayed labels with the relative margin `max_error_increase` r, by a large-sample
  (Welch) z-test on D = MAE_canary - (1 + r) MAE_champion, each mean's variance from the window's
  sums of |error| and |error|^2: fail when D's lower bound is above 0, early pass when its upper
  bound is below 0. The interval shown is Fieller's for MAE_canary / MAE_champion - 1, which is the
  same test read on the ratio. Assumes independent labelled rows and |error| with finite variance,
  enough of them for the central limit theorem (`min_labels` per variant); heavy-tailed errors
  make it approximate.

`judge_window` runs the checks the plan tests at a step and combines them: any `fail` fails the
window; it passes when every check passed (accuracy, or a regression plan's mae, may stay `not_yet`
unless `labels_required`: delayed labels are optional feedback). Labels are best pooled over the
whole rollout (a label for a request of step 1 may arrive during step 2), which the plan allows:
accuracy is one check per step.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from domain.distributions import (
    binomial_cdf,
    binomial_sf,
    chi2_sf,
    exceedance_sf,
    hypergeometric_sf,
    newcombe_difference_interval,
    normal_cdf,
    normal_quantile,
    wilson_interval,
)
from domain.evidence import CheckEvidence, CheckOutcome
from domain.histogram import LatencyHistogram
from domain.sequential import LABEL_CHECK, CheckName, SpendingPlan, alpha_for
from domain.spec import CanarySpec

LATENCY_QUANTILE = 0.99  # the policy's thresholds are named p99
# The ratio is tested in the body and in the tail: at p99 alone, 200 requests see two tail samples
# and a model twice as slow hides behind shared scheduler jitter (see the module docstring).
LATENCY_QUANTILES = (0.5, LATENCY_QUANTILE)
PSI_FLOOR = 1e-4  # a class one side never predicted counts as this share
_LABEL_CHECKS = frozenset(LABEL_CHECK.values())  # decided at `min_labels`, optional unless labels_required


def _significant(p_value: float, alpha: float) -> bool:
    return alpha > 0.0 and p_value <= alpha


def _z(alpha: float) -> float | None:
    return normal_quantile(1.0 - alpha) if alpha > 0.0 else None


def _outcome(failed: bool, proven: bool, final: bool) -> CheckOutcome:
    if failed:
        return CheckOutcome.FAIL
    return CheckOutcome.PASS if proven or final else CheckOutcome.NOT_YET


def _verdict_words(outcome: CheckOutcome) -> str:
    return {CheckOutcome.PASS: "pass", CheckOutcome.FAIL: "fail", CheckOutcome.NOT_YET: "not yet"}[outcome]


def _evidence(
    check: CheckName,
    outcome: CheckOutcome,
    reason: str,
    alpha: float,
    threshold: float | None,
    sizes: tuple[int, int | None],
    statistic: float | None = None,
    *,
    interval: tuple[float, float] | None = None,
    p_value: float | None = None,
    measures: dict[str, float] | None = None,
) -> CheckEvidence:
    head = {"check": check, "outcome": outcome, "reason": reason, "alpha": alpha, "threshold": threshold}
    body = {"statistic": statistic, "interval": interval, "p_value": p_value, "measures": measures or {}}
    return CheckEvidence.model_validate({**head, **body, "canary_n": sizes[0], "champion_n": sizes[1]})


def _waiting(
    check: CheckName, what: str, alpha: float, threshold: float | None, sizes: tuple[int, int]
) -> CheckEvidence:
    """`not_yet` for want of data: never a pass on no data."""
    reason = f"{what} so far: canary {sizes[0]}, champion {sizes[1]}"
    return _evidence(check, CheckOutcome.NOT_YET, reason, alpha, threshold, sizes)


class Tally(NamedTuple):
    """How many of `n` trials had the event (errors among requests, right answers among labels)."""

    hits: int
    n: int

    @property
    def rate(self) -> float:
        return self.hits / self.n


def _difference_interval(canary: Tally, champion: Tally, alpha: float) -> tuple[float, float] | None:
    z = _z(alpha)
    return None if z is None else newcombe_difference_interval(canary.hits, canary.n, champion.hits, champion.n, z)


def error_rate_check(errors: int, requests: int, *, max_error_rate: float, alpha: float, final: bool) -> CheckEvidence:
    """Canary error rate against the policy's absolute limit (exact binomial test)."""
    if requests == 0:
        return _evidence("error_rate", CheckOutcome.NOT_YET, "no canary requests yet", alpha, max_error_rate, (0, None))
    p_value = 1.0 if max_error_rate >= 1.0 else binomial_sf(errors, requests, max_error_rate)
    proven = alpha > 0.0 and binomial_cdf(errors, requests, max_error_rate) <= alpha
    outcome = _outcome(_significant(p_value, alpha), proven, final)
    z = _z(alpha)
    interval = wilson_interval(errors, requests, z) if z is not None else None
    bounds = f", interval [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
    reason = (
        f"{_verdict_words(outcome)}: {errors}/{requests} errors vs limit {max_error_rate:.4f}"
        f"{bounds}, p = {p_value:.3g} (alpha {alpha:.3g})"
    )
    sizes = (requests, None)
    return _evidence(
        "error_rate",
        outcome,
        reason,
        alpha,
        max_error_rate,
        sizes,
        errors / requests,
        interval=interval,
        p_value=p_value,
    )


def error_rate_vs_champion_check(canary: Tally, champion: Tally, *, alpha: float, final: bool) -> CheckEvidence:
    """Does the canary err more often than the champion on the same window (Fisher, one-sided)?

    `canary`, `champion`: errors among requests."""
    if canary.n == 0 or champion.n == 0:
        return _waiting("error_rate_vs_champion", "requests", alpha, None, (canary.n, champion.n))
    p_value = hypergeometric_sf(canary.hits, canary.n + champion.n, canary.hits + champion.hits, canary.n)
    outcome = _outcome(_significant(p_value, alpha), False, final)
    reason = (
        f"{_verdict_words(outcome)}: canary {canary.rate:.4f} vs champion {champion.rate:.4f} errors, "
        f"Fisher p = {p_value:.3g} (alpha {alpha:.3g})"
    )
    measures = {"canary_error_rate": canary.rate, "champion_error_rate": champion.rate}
    return _evidence(
        "error_rate_vs_champion",
        outcome,
        reason,
        alpha,
        0.0,
        (canary.n, champion.n),
        canary.rate - champion.rate,
        interval=_difference_interval(canary, champion, alpha),
        p_value=p_value,
        measures=measures,
    )


def _exceedance(
    canary: LatencyHistogram, champion: LatencyHistogram, quantile: float, max_ratio: float, slack_ms: float
) -> tuple[int, float, float, float]:
    """(canary samples certainly above T, T in ms, expected count under H0, p-value) at one quantile."""
    n, m = canary.total, champion.total
    rank = min(m, max(1, math.ceil(quantile * m)))
    threshold_ms = max_ratio * champion.order_statistic(rank)[1] + slack_ms
    exceed = canary.count_above(threshold_ms) if math.isfinite(threshold_ms) else 0
    return exceed, threshold_ms, n * (m - rank + 1) / (m + 1), exceedance_sf(exceed, n, m, rank)


def latency_check(
    canary: LatencyHistogram,
    champion: LatencyHistogram,
    *,
    max_ratio: float,
    slack_ms: float,
    alpha: float,
    final: bool,
    quantiles: tuple[float, ...] = LATENCY_QUANTILES,
) -> CheckEvidence:
    """Canary vs champion with the allowed ratio and slack: exceedance tests at the champion's
    median and p99, each at alpha / len(quantiles) (the statistic shown is the p99 ratio)."""
    n, m = canary.total, champion.total
    if n == 0 or m == 0:
        return _waiting("latency", "latencies", alpha, max_ratio, (n, m))
    measures: dict[str, float] = {}
    parts, p_values = [], []
    for quantile in quantiles:
        exceed, threshold_ms, expected, p_value = _exceedance(canary, champion, quantile, max_ratio, slack_ms)
        label = f"p{quantile * 100:g}"
        measures |= {f"{label}_threshold_ms": threshold_ms, f"{label}_exceedances": float(exceed)}
        parts.append(f"{label}: {exceed} above {threshold_ms:.2f} ms ({expected:.1f} expected, p = {p_value:.3g})")
        p_values.append(p_value)
    adjusted = min(1.0, len(quantiles) * min(p_values))
    outcome = _outcome(_significant(adjusted, alpha), False, final)
    canary_q, champion_q = canary.quantile(LATENCY_QUANTILE), champion.quantile(LATENCY_QUANTILE)
    ratio = canary_q / champion_q if canary_q is not None and champion_q else None
    measures |= {"canary_p99_ms": canary_q or 0.0, "champion_p99_ms": champion_q or 0.0}
    shown = "n/a" if ratio is None else f"{ratio:.2f}"
    reason = (
        f"{_verdict_words(outcome)}: p99 ratio {shown} (limit {max_ratio:g}, slack {slack_ms:g} ms); "
        f"canary requests of {n} above {max_ratio:g} x champion + slack at {'; '.join(parts)}; "
        f"adjusted p = {adjusted:.3g} (alpha {alpha:.3g})"
    )
    return _evidence("latency", outcome, reason, alpha, max_ratio, (n, m), ratio, p_value=adjusted, measures=measures)


def population_stability(expected: Mapping[str, int], actual: Mapping[str, int]) -> float:
    """PSI of `actual` against `expected` counts, shares floored at PSI_FLOOR (0: identical)."""
    total_e, total_a = sum(expected.values()), sum(actual.values())
    if total_e == 0 or total_a == 0:
        return 0.0
    shares = (
        (max(expected.get(c, 0) / total_e, PSI_FLOOR), max(actual.get(c, 0) / total_a, PSI_FLOOR))
        for c in set(expected) | set(actual)
    )
    return sum((a - e) * math.log(a / e) for e, a in shares)


def _chi2_homogeneity(a: Sequence[int], b: Sequence[int]) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of a 2 x K table's homogeneity test."""
    n_a, n_b = sum(a), sum(b)
    total = n_a + n_b
    statistic = 0.0
    for x, y in zip(a, b, strict=True):
        column = x + y
        for observed, row in ((x, n_a), (y, n_b)):
            expected = row * column / total
            statistic += (observed - expected) ** 2 / expected
    df = len(a) - 1
    return statistic, df, chi2_sf(statistic, df) if df > 0 else 1.0


def _total_variation_lower(a: Sequence[int], b: Sequence[int], alpha: float) -> tuple[float, float]:
    """(total variation distance, a lower bound holding with 1 - alpha over all classes at once)."""
    n_a, n_b, k = sum(a), sum(b), len(a)
    z = normal_quantile(1.0 - alpha / (2 * k)) if alpha > 0.0 else math.inf
    distance = lower = 0.0
    for x, y in zip(a, b, strict=True):
        gap = abs(x / n_a - y / n_b)
        # Shares smoothed by half a count, so an empty class still has a margin.
        p, q = (x + 0.5) / (n_a + 1.0), (y + 0.5) / (n_b + 1.0)
        margin = z * math.sqrt(p * (1 - p) / n_a + q * (1 - q) / n_b)
        distance += gap / 2
        lower += max(0.0, gap - margin) / 2
    return distance, lower


def prediction_drift_check(
    canary_counts: Mapping[str, int],
    champion_counts: Mapping[str, int],
    *,
    max_psi: float,
    alpha: float,
    final: bool,
    expected_disagreement: float | None = None,
) -> CheckEvidence:
    """Predicted-class (or binned output) distributions: homogeneity, effect size, expected change."""
    if expected_disagreement is not None and not 0.0 <= expected_disagreement <= 1.0:
        raise ValueError(f"expected_disagreement is a rate in [0, 1] (got {expected_disagreement})")
    classes = sorted(
        c for c in set(canary_counts) | set(champion_counts) if canary_counts.get(c, 0) + champion_counts.get(c, 0)
    )
    a = [canary_counts.get(c, 0) for c in classes]
    b = [champion_counts.get(c, 0) for c in classes]
    n, m = sum(a), sum(b)
    if n == 0 or m == 0:
        return _waiting("prediction_drift", "predictions", alpha, max_psi, (n, m))
    chi2, df, p_value = _chi2_homogeneity(a, b)
    psi = population_stability(champion_counts, canary_counts)
    distance, distance_low = _total_variation_lower(a, b, alpha)
    beyond_expected = expected_disagreement is None or distance_low > expected_disagreement
    failed = _significant(p_value, alpha) and psi > max_psi and beyond_expected
    outcome = _outcome(failed, False, final)
    expected = (
        ""
        if expected_disagreement is None
        else f"; divergence >= {distance_low:.3f} vs gate disagreement {expected_disagreement:.3f}"
    )
    measures = {"chi2": chi2, "df": float(df), "total_variation": distance, "total_variation_lower": distance_low}
    if expected_disagreement is not None:
        measures["expected_disagreement"] = expected_disagreement
    reason = (
        f"{_verdict_words(outcome)}: PSI {psi:.3f} (limit {max_psi:g}), chi2 {chi2:.1f} on {df} df, "
        f"p = {p_value:.3g} (alpha {alpha:.3g}){expected}"
    )
    return _evidence(
        "prediction_drift", outcome, reason, alpha, max_psi, (n, m), psi, p_value=p_value, measures=measures
    )


def binned_counts(values: Iterable[float], edges: Sequence[float]) -> dict[str, int]:
    """Counts of regression outputs per bin, for `prediction_drift_check` (bins fixed in advance).

    `edges` rise; bin i holds values in [edges[i-1], edges[i]), bin 0 everything below edges[0], the
    last bin edges[-1] and above: `numpy.searchsorted(edges, value, side="right")`, as the model
    server and the gate's disagreement (`ml/evaluation/comparison.py`) bin. Use the same edges for
    both variants (the champion's `prediction_bins`).
    """
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"bin edges must rise strictly (got {list(edges)})")
    return dict(Counter(str(bisect.bisect_right(edges, value)) for value in values))


def accuracy_check(canary: Tally, champion: Tally, *, max_drop: float, alpha: float, final: bool) -> CheckEvidence:
    """Non-inferiority of the canary's accuracy with margin `max_drop` (Newcombe interval).

    `canary`, `champion`: right answers among labelled rows."""
    if canary.n == 0 or champion.n == 0:
        return _waiting("accuracy", "labels", alpha, max_drop, (canary.n, champion.n))
    interval = _difference_interval(canary, champion, alpha)
    failed = interval is not None and interval[1] < -max_drop
    proven = interval is not None and interval[0] > -max_drop
    outcome = _outcome(failed, proven, final)
    bounds = f" [{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else ""
    reason = (
        f"{_verdict_words(outcome)}: canary {canary.rate:.4f} ({canary.n} labels) vs champion {champion.rate:.4f} "
        f"({champion.n}), difference{bounds} vs margin -{max_drop:g} (alpha {alpha:.3g})"
    )
    measures = {"canary_accuracy": canary.rate, "champion_accuracy": champion.rate}
    sizes = (canary.n, champion.n)
    statistic = canary.rate - champion.rate
    return _evidence(
        "accuracy", outcome, reason, alpha, max_drop, sizes, statistic, interval=interval, measures=measures
    )


class AbsErrors(NamedTuple):
    """A variant's labelled rows as sums: count, sum of |error| and sum of |error|^2 (target units)."""

    n: int
    total: float
    squares: float

    @property
    def mean(self) -> float:
        return self.total / self.n

    @property
    def mean_variance(self) -> float:
        """The variance of the mean |error| (the sample variance over n; 0 for a single row)."""
        if self.n < 2:
            return 0.0
        variance = max(0.0, (self.squares - self.total * self.total / self.n) / (self.n - 1))
        return variance / self.n


def _fieller_bounds(canary: AbsErrors, champion: AbsErrors, z: float) -> tuple[float, float] | None:
    """One-sided bounds (each at the level of `z`) of MAE_canary / MAE_champion, by Fieller's method:
    the ratios rho for which MAE_canary - rho MAE_champion is not significant. None when the
    champion's MAE is not itself significantly above 0 (the ratio is then unbounded)."""
    a, b = canary.mean, champion.mean
    va, vb = canary.mean_variance, champion.mean_variance
    lead = b * b - z * z * vb
    if lead <= 0.0:
        return None
    root = z * math.sqrt(max(0.0, va * b * b + vb * a * a - z * z * va * vb))
    return (a * b - root) / lead, (a * b + root) / lead


def mae_check(
    canary: AbsErrors, champion: AbsErrors, *, max_increase: float, alpha: float, final: bool
) -> CheckEvidence:
    """Non-inferiority of the canary's mean absolute error, relative margin `max_increase` (regression).

    H0 (fail): MAE_canary > (1 + max_increase) MAE_champion. Welch's large-sample z-test on
    D = MAE_canary - (1 + max_increase) MAE_champion with variance var_c/n_c + (1 + m)^2 var_h/n_h
    from the sums (normal approximation by the central limit theorem: independent rows, |error| of
    finite variance, `min_labels` per variant). Fail when D's lower bound at `alpha` is above 0;
    early pass when its upper bound is below 0; at the planned sample a window that did not fail
    passes (as accuracy). The statistic is the relative increase MAE_canary / MAE_champion - 1."""
    if canary.n == 0 or champion.n == 0:
        return _waiting("mae", "labels", alpha, max_increase, (canary.n, champion.n))
    scale = 1.0 + max_increase
    difference = canary.mean - scale * champion.mean
    se = math.sqrt(canary.mean_variance + scale * scale * champion.mean_variance)
    z = _z(alpha)
    # se 0: every |error| is equal within each variant, so the sign of D is certain
    p_value = normal_cdf(-difference / se) if se > 0.0 else float(difference <= 0.0)
    failed = _significant(p_value, alpha)
    proven = z is not None and difference + z * se < 0.0
    outcome = _outcome(failed, proven, final)
    bounds = None if z is None else _fieller_bounds(canary, champion, z)
    interval = None if bounds is None else (bounds[0] - 1.0, bounds[1] - 1.0)
    relative = canary.mean / champion.mean - 1.0 if champion.mean > 0.0 else None
    shown = "n/a (champion MAE 0)" if relative is None else f"{relative * 100:+.1f} %"
    limits = f" [{interval[0] * 100:+.1f} %, {interval[1] * 100:+.1f} %]" if interval else ""
    reason = (
        f"{_verdict_words(outcome)}: MAE canary {canary.mean:.4g} ({canary.n} labels) vs champion "
        f"{champion.mean:.4g} ({champion.n}), change {shown}{limits} vs allowed +{max_increase * 100:g} %, "
        f"p = {p_value:.3g} (alpha {alpha:.3g})"
    )
    measures = {
        "canary_mae": canary.mean,
        "champion_mae": champion.mean,
        "difference": difference,
        "standard_error": se,
    }
    sizes = (canary.n, champion.n)
    return _evidence(
        "mae", outcome, reason, alpha, max_increase, sizes, relative, interval=interval, p_value=p_value,
        measures=measures,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class VariantSample:
    """What `judge_window` needs of one variant: the window's requests, errors, latencies and
    predictions, and the labels (best: pooled since the rollout began)."""

    requests: int
    errors: int
    latency: LatencyHistogram
    class_counts: Mapping[str, int]
    labelled: int = 0
    correct: int = 0
    abs_error_sum: float = 0.0  # regression: sums of |error| and |error|^2 over the labelled rows
    abs_error_sq_sum: float = 0.0

    @property
    def abs_errors(self) -> AbsErrors:
        return AbsErrors(self.labelled, self.abs_error_sum, self.abs_error_sq_sum)


class WindowJudgement(BaseModel):
    """The combined outcome of one analysed window and each check's evidence."""

    model_config = ConfigDict(frozen=True)

    outcome: CheckOutcome
    reason: str
    checks: tuple[CheckEvidence, ...]

    def check(self, name: CheckName) -> CheckEvidence | None:
        return next((c for c in self.checks if c.check == name), None)


def judge_window(
    canary: VariantSample,
    champion: VariantSample,
    policy: CanarySpec,
    plan: SpendingPlan,
    step: int,
    *,
    look: int = 1,
    expected_disagreement: float | None = None,
    labels_required: bool = False,
    at_deadline: bool = False,
) -> WindowJudgement:
    """Run the checks `plan` tests at `step` (0-based) on one window and combine them.

    `look` counts this window's interim looks (1-based); a check whose planned sample is reached is
    on its final look. `at_deadline`: the step's deadline has come, so `not_yet` fails closed. The
    plan's task (`SpendingPlan.for_policy(…, task=…)`) names the delayed-label check: accuracy, or
    for regression `mae`.
    """
    compares = plan.checks_at(step)
    full = canary.requests >= policy.min_requests and (
        "latency" not in compares or champion.requests >= policy.min_requests
    )
    labelled = min(canary.labelled, champion.labelled) >= policy.min_labels

    tests: dict[CheckName, Callable[[float, bool], CheckEvidence]] = {
        "error_rate": lambda alpha, final: error_rate_check(
            canary.errors, canary.requests, max_error_rate=policy.max_error_rate, alpha=alpha, final=final
        ),
        "error_rate_vs_champion": lambda alpha, final: error_rate_vs_champion_check(
            Tally(canary.errors, canary.requests), Tally(champion.errors, champion.requests), alpha=alpha, final=final
        ),
        "latency": lambda alpha, final: latency_check(
            canary.latency,
            champion.latency,
            max_ratio=policy.max_latency_p99_ratio,
            slack_ms=policy.latency_p99_slack_ms,
            alpha=alpha,
            final=final,
        ),
        "prediction_drift": lambda alpha, final: prediction_drift_check(
            canary.class_counts,
            champion.class_counts,
            max_psi=policy.max_prediction_psi,
            alpha=alpha,
            final=final,
            expected_disagreement=expected_disagreement,
        ),
        "accuracy": lambda alpha, final: accuracy_check(
            Tally(canary.correct, canary.labelled),
            Tally(champion.correct, champion.labelled),
            max_drop=policy.max_accuracy_drop,
            alpha=alpha,
            final=final,
        ),
        "mae": lambda alpha, final: mae_check(
            canary.abs_errors, champion.abs_errors, max_increase=policy.max_error_increase, alpha=alpha, final=final
        ),
    }
    checks = []
    for name in compares:
        final = labelled if name in _LABEL_CHECKS else full
        checks.append(tests[name](alpha_for(plan, step, name, look, final=final), final))
    return _combine(tuple(checks), labels_required=labels_required, at_deadline=at_deadline)


def _combine(checks: tuple[CheckEvidence, ...], *, labels_required: bool, at_deadline: bool) -> WindowJudgement:
    failed = [c for c in checks if c.outcome is CheckOutcome.FAIL]
    if failed:
        why = "; ".join(f"{c.check}: {c.reason}" for c in failed)
        return WindowJudgement(outcome=CheckOutcome.FAIL, reason=why, checks=checks)
    waiting = [
        c for c in checks if c.outcome is CheckOutcome.NOT_YET and (labels_required or c.check not in _LABEL_CHECKS)
    ]
    if not waiting:
        return WindowJudgement(outcome=CheckOutcome.PASS, reason="every check passed", checks=checks)
    why = "; ".join(f"{c.check}: {c.reason}" for c in waiting)
    if at_deadline:
        return WindowJudgement(
            outcome=CheckOutcome.FAIL, reason=f"no decision by the step's deadline (fails closed): {why}", checks=checks
        )
    return WindowJudgement(outcome=CheckOutcome.NOT_YET, reason=f"collecting: {why}", checks=checks)
