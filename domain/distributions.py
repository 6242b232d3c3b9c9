"""The few probability functions the canary tests need, in pure Python (`domain/` has no SciPy).

Each is exact or a named, standard approximation:
- binomial and hypergeometric tails: sums of exact log-space probabilities (`math.lgamma`),
  started at the cut and stopped once the terms fall below 1e-17 of the sum past the mode, so a
  tail costs a few dozen terms rather than `n`;
- the exceedance distribution (how many of `n` new samples exceed the `k`-th smallest of `m` old
  ones, Gumbel and von Schelling 1950; the basis of precedence tests): exact, distribution-free;
- the chi-square tail via the regularized upper incomplete gamma function Q(a, x): the series for
  x < a + 1 and the modified Lentz continued fraction otherwise (Numerical Recipes, 3rd ed., 6.2);
- the noncentral chi-square tail by Patnaik's two-moment approximation (Biometrika 36, 1949),
  used only for power (a planning figure), never for a verdict;
- the Wilson score interval for a proportion (Wilson 1927) and Newcombe's hybrid score interval
  for a difference of two proportions (method 10 of Newcombe, Statistics in Medicine 17, 1998).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

_NORMAL = NormalDist()
_NEGLIGIBLE = 1e-17
_GAMMA_EPS = 1e-15
_GAMMA_MAX_ITERATIONS = 10_000


def normal_quantile(p: float) -> float:
    """z with P(Z <= z) = p for a standard normal Z."""
    return _NORMAL.inv_cdf(p)


def normal_cdf(z: float) -> float:
    return _NORMAL.cdf(z)


def log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _tail(log_pmf: Callable[[int], float], start: int, stop: int, step: int) -> float:
    """Sum pmf(start), pmf(start + step), … up to `stop` inclusive, for a unimodal pmf.

    Summation stops once a term is smaller than the one before (past the mode, so every later term
    is smaller still) and negligible against the sum.
    """
    total, previous = 0.0, -math.inf
    for k in range(start, stop + step, step):
        term = math.exp(log_pmf(k))
        total += term
        if term < previous and term <= total * _NEGLIGIBLE:
            break
        previous = term
    return min(total, 1.0)


def _binomial_log_pmf(n: int, p: float) -> Callable[[int], float]:
    log_p, log_q = math.log(p), math.log1p(-p)
    return lambda k: log_choose(n, k) + k * log_p + (n - k) * log_q


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return _tail(_binomial_log_pmf(n, p), k, n, 1)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    return _tail(_binomial_log_pmf(n, p), k, 0, -1)


def hypergeometric_sf(k: int, population: int, successes: int, draws: int) -> float:
    """P(X >= k) for X the successes among `draws` taken without replacement (Fisher's exact test)."""
    low, high = max(0, draws - (population - successes)), min(successes, draws)
    if k <= low:
        return 1.0
    if k > high:
        return 0.0
    denominator = log_choose(population, draws)

    def log_pmf(x: int) -> float:
        return log_choose(successes, x) + log_choose(population - successes, draws - x) - denominator

    return _tail(log_pmf, k, high, 1)


def exceedance_sf(e: int, n: int, m: int, k: int) -> float:
    """P(E >= e), E = how many of `n` new samples exceed the `k`-th smallest of `m` old ones.

    Exact for continuous data when the new samples are no larger than the old (stochastically);
    P(E = j) = C(m-k+j, j) C(k-1+n-j, n-j) / C(m+n, n).
    """
    if not 1 <= k <= m:
        raise ValueError(f"order statistic k={k} must lie in 1..{m}")
    if e <= 0:
        return 1.0
    if e > n:
        return 0.0
    denominator = log_choose(m + n, n)

    def log_pmf(j: int) -> float:
        return log_choose(m - k + j, j) + log_choose(k - 1 + n - j, n - j) - denominator

    return _tail(log_pmf, e, n, 1)


def smallest_count(n: int, sf: Callable[[int], float], alpha: float) -> int | None:
    """Smallest count c in 1..n with sf(c) <= alpha (sf decreasing); None when none is that rare."""
    if sf(n) > alpha:
        return None
    low, high = 1, n
    while low < high:
        middle = (low + high) // 2
        if sf(middle) <= alpha:
            high = middle
        else:
            low = middle + 1
    return low


def regularized_gamma_q(a: float, x: float) -> float:
    """Q(a, x) = Γ(a, x) / Γ(a), the regularized upper incomplete gamma function."""
    if a <= 0:
        raise ValueError(f"gamma shape must be positive (got {a})")
    if x <= 0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        # Series for P(a, x): sum x^n / (a (a+1) … (a+n)).
        term = total = 1.0 / a
        denominator = a
        for _ in range(_GAMMA_MAX_ITERATIONS):
            denominator += 1.0
            term *= x / denominator
            total += term
            if abs(term) < abs(total) * _GAMMA_EPS:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    # Continued fraction for Q(a, x), modified Lentz.
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, _GAMMA_MAX_ITERATIONS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _GAMMA_EPS:
            break
    return min(1.0, math.exp(log_prefix) * h)


def chi2_sf(x: float, df: float) -> float:
    """P(X >= x) for X ~ chi-square with `df` degrees of freedom."""
    return regularized_gamma_q(df / 2.0, x / 2.0)


def chi2_isf(p: float, df: float) -> float:
    """x with P(X >= x) = p for X ~ chi-square(df) (bisection on `chi2_sf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a tail probability lies in (0, 1) (got {p})")
    low, high = 0.0, max(1.0, df)
    while chi2_sf(high, df) > p:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if chi2_sf(middle, df) > p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-10 * high:
            break
    return (low + high) / 2.0


def noncentral_chi2_sf(x: float, df: float, noncentrality: float) -> float:
    """P(X >= x) for a noncentral chi-square, Patnaik's approximation c * chi-square(h)."""
    if noncentrality <= 0.0:
        return chi2_sf(x, df)
    scale = (df + 2.0 * noncentrality) / (df + noncentrality)
    shape = (df + noncentrality) ** 2 / (df + 2.0 * noncentrality)
    return chi2_sf(x / scale, shape)


def wilson_interval(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval for a proportion; each side excludes the truth with P(Z > z)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference_interval(
    successes_a: int, n_a: int, successes_b: int, n_b: int, z: float
) -> tuple[float, float]:
    """Interval for p_a - p_b from the two Wilson intervals (Newcombe's hybrid score, method 10)."""
    p_a, p_b = successes_a / n_a, successes_b / n_b
    low_a, high_a = wilson_interval(successes_a, n_a, z)
    low_b, high_b = wilson_interval(successes_b, n_b, z)
    difference = p_a - p_b
    lower = difference - math.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2)
    upper = difference + math.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2)
    return max(-1.0, lower), min(1.0, upper)
