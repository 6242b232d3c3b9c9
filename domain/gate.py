"""The promotion gate: `decide_promotion(candidate, champion, policy) -> GateDecision`.

Pure and deterministic: the numbers come in (measured by ml/ on the SAME test split for both
models), a decision with one verdict per check comes out, and every verdict carries its numbers
and a reason a person can read. Rules:

- **Absolute checks** (`gates.min`, `gates.max`) apply to every candidate.
- **Relative checks** (`gates.vs_champion`) need a champion evaluated on the same data:
  - quality metrics (`min_delta`) are decided on the paired-bootstrap interval of the
    improvement (candidate - champion, sign-flipped for lower-is-better metrics such as
    log_loss): *superiority* passes when the interval's lower bound is above `min_delta`;
    *non-inferiority* passes when it is above `-|min_delta|` (the margin the candidate may lose);
  - cost metrics (`max_ratio`, e.g. latency) compare candidate / champion point values.
- **Direction.** Whether higher is better comes with the interval when the evaluation knows it
  (`DifferenceInterval.higher_is_better`: a custom metric that sets `higher_is_better = False`
  on its function is gated like log_loss); otherwise from `LOWER_IS_BETTER` below. `gates.min`
  and `gates.max` are explicit floors and ceilings, so they need no direction.
- **Undefined metrics fail.** A metric that is NaN (roc_auc or pr_auc on a test split whose
  labels hold one class) or whose paired interval is NaN (too many bootstrap resamples with one
  class) rejects with a reason saying so, never treated as 0.5 or as a pass.
- **Insufficient evidence fails.** A relative check at confidence c needs at least
  `ceil(5 / (1 - c))` test examples (100 at 95 %, 500 at 99 %), or `gates.min_test_examples`:
  fewer cannot support a percentile interval's tails, and the check is rejected with reason
  "insufficient evidence", never passed.
- **Per-class guard** (`gates.max_class_recall_drop`): no class's recall may drop more than that.
- **First model** (no champion): relative checks are recorded as skipped, absolute checks decide.
- **Fail closed.** A missing metric, a missing interval, or a champion that could not be
  evaluated (unreadable artifact, digest mismatch) rejects, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from domain.entities import GateCheck, Verdict
from domain.spec import GatesSpec
from domain.task import COST_METRICS, QUALITY_METRICS

# Metrics where lower is better; everything else is higher-is-better.
LOWER_IS_BETTER = frozenset(
    {name for quality in QUALITY_METRICS.values() for name, higher in quality.items() if not higher} | set(COST_METRICS)
)


@dataclass(frozen=True, slots=True)
class DifferenceInterval:
    """Paired-bootstrap interval of (candidate - champion) for one metric, on the same data."""

    metric: str
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    n_examples: int
    # None: the gate decides from LOWER_IS_BETTER (built-in and cost metrics)
    higher_is_better: bool | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-safe: an undefined bound (NaN) becomes None, which PostgreSQL's JSONB can store."""
        return {
            name: None if isinstance(value, float) and not math.isfinite(value) else value
            for name in self.__slots__
            for value in (getattr(self, name),)
        }


@dataclass(frozen=True, slots=True)
class ModelEvidence:
    """What the gate knows about one model, measured on the shared test split."""

    metrics: dict[str, float]
    class_recall: dict[str, float] = field(default_factory=dict)
    n_examples: int = 0


@dataclass(frozen=True, slots=True)
class ChampionEvidence:
    """The champion's side: its evidence, the intervals against it, or why it could not be read."""

    evidence: ModelEvidence | None
    intervals: dict[str, DifferenceInterval] = field(default_factory=dict)
    error: str | None = None  # set when the champion could not be evaluated: fail closed


@dataclass(frozen=True, slots=True)
class GateDecision:
    passed: bool
    first_model: bool
    reason: str
    checks: tuple[GateCheck, ...]

    @property
    def failed_checks(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if c.verdict is Verdict.FAIL)


def min_examples_for(confidence: float) -> int:
    return math.ceil(5 / (1 - confidence))


def decide_promotion(candidate: ModelEvidence, champion: ChampionEvidence | None, policy: GatesSpec) -> GateDecision:
    checks: list[GateCheck] = []
    checks += _absolute_checks(candidate, policy)
    first_model = champion is None
    if champion is None:
        checks += [
            GateCheck(metric, "vs_champion", Verdict.SKIPPED, "first model: no champion; absolute checks only")
            for metric in policy.vs_champion
        ]
    else:
        checks += _relative_checks(candidate, champion, policy)
        checks += _class_guard(candidate, champion, policy)
    failed = [c for c in checks if c.verdict is Verdict.FAIL]
    if failed:
        reason = "rejected: " + "; ".join(f"{c.metric} ({c.check}): {c.reason}" for c in failed)
    elif first_model:
        reason = "passed: first model, absolute checks only"
    else:
        reason = "passed: every check against the absolute limits and the champion"
    overall = GateCheck("overall", "overall", Verdict.FAIL if failed else Verdict.PASS, reason)
    return GateDecision(not failed, first_model, reason, (*checks, overall))


def _value(evidence: ModelEvidence, metric: str) -> float | None:
    value = evidence.metrics.get(metric)
    return None if value is None or not math.isfinite(value) else float(value)


def _unusable(evidence: ModelEvidence, metric: str, side: str) -> str:
    """Why `_value` gave None: the metric was not measured, or it is undefined on this data."""
    if metric not in evidence.metrics:
        return f"metric missing {side} (fail closed)"
    return (
        f"{metric} is undefined {side} (NaN: a ranking metric needs both classes in the test labels; "
        "add examples of the missing class to the data) (fail closed)"
    )


def _absolute_checks(candidate: ModelEvidence, policy: GatesSpec) -> list[GateCheck]:
    checks = []
    for check, limits in (("min", policy.min), ("max", policy.max)):
        for metric, limit in limits.items():
            value = _value(candidate, metric)
            if value is None:
                why = _unusable(candidate, metric, "from the evaluation")
                checks.append(GateCheck(metric, check, Verdict.FAIL, why, threshold=limit))
                continue
            ok = value >= limit if check == "min" else value <= limit
            relation = (">=" if ok else "<") if check == "min" else ("<=" if ok else ">")
            checks.append(
                GateCheck(
                    metric,
                    check,
                    Verdict.PASS if ok else Verdict.FAIL,
                    f"{value:.6g} {relation} {limit:.6g}",
                    candidate_value=value,
                    threshold=limit,
                )
            )
    return checks


def _relative_checks(candidate: ModelEvidence, champion: ChampionEvidence, policy: GatesSpec) -> list[GateCheck]:
    checks = []
    for metric, rule in policy.vs_champion.items():
        cand = _value(candidate, metric)
        champ = _value(champion.evidence, metric) if champion.evidence is not None else None
        if champion.error is not None or champion.evidence is None:
            why = champion.error or "champion was not evaluated"
            checks.append(
                GateCheck(
                    metric, "vs_champion", Verdict.FAIL, f"champion unusable: {why} (fail closed)", candidate_value=cand
                )
            )
            continue
        if cand is None or champ is None:
            side, evidence = ("candidate", candidate) if cand is None else ("champion", champion.evidence)
            why = _unusable(evidence, metric, f"for the {side}")
            checks.append(GateCheck(metric, "vs_champion", Verdict.FAIL, why, cand, champ))
            continue
        if rule.max_ratio is not None:
            checks.append(_ratio_check(metric, cand, champ, rule.max_ratio))
        if rule.min_delta is not None:
            checks.append(
                _interval_check(
                    metric,
                    cand,
                    champ,
                    rule.min_delta,
                    rule.confidence,
                    rule.mode,
                    champion.intervals.get(metric),
                    candidate.n_examples,
                    policy,
                )
            )
    return checks


def _ratio_check(metric: str, cand: float, champ: float, max_ratio: float) -> GateCheck:
    if champ <= 0:
        return GateCheck(
            metric,
            "vs_champion",
            Verdict.FAIL,
            f"champion value {champ:.6g} <= 0: ratio undefined",
            cand,
            champ,
            threshold=max_ratio,
        )
    ratio = cand / champ
    ok = ratio <= max_ratio
    return GateCheck(
        metric,
        "vs_champion",
        Verdict.PASS if ok else Verdict.FAIL,
        f"candidate/champion = {ratio:.3f} {'<=' if ok else '>'} {max_ratio:.3f}",
        cand,
        champ,
        threshold=max_ratio,
    )


def _interval_check(
    metric: str,
    cand: float,
    champ: float,
    min_delta: float,
    confidence: float,
    mode: str,
    interval: DifferenceInterval | None,
    n_examples: int,
    policy: GatesSpec,
) -> GateCheck:
    needed = policy.min_test_examples or min_examples_for(confidence)
    if n_examples < needed:
        return GateCheck(
            metric,
            "vs_champion",
            Verdict.FAIL,
            f"insufficient evidence: {n_examples} test examples, need >= {needed} for {confidence:.0%} confidence",
            cand,
            champ,
            threshold=min_delta,
        )
    if interval is None or abs(interval.confidence - confidence) > 1e-9:
        return GateCheck(
            metric,
            "vs_champion",
            Verdict.FAIL,
            f"no paired interval at {confidence:.0%} for {metric} (fail closed)",
            cand,
            champ,
            threshold=min_delta,
        )
    if not (math.isfinite(interval.ci_low) and math.isfinite(interval.ci_high)):
        return GateCheck(
            metric,
            "vs_champion",
            Verdict.FAIL,
            f"insufficient evidence: the paired interval of {metric} is undefined (too many bootstrap "
            "resamples hold one class only; a larger test split fixes it) (fail closed)",
            cand,
            champ,
            threshold=min_delta,
        )
    higher_is_better = interval.higher_is_better
    if higher_is_better is None:
        higher_is_better = metric not in LOWER_IS_BETTER
    sign = 1.0 if higher_is_better else -1.0
    # improvement = how much better the candidate is, whatever the metric's direction
    low, high = sorted((sign * interval.ci_low, sign * interval.ci_high))
    bound = min_delta if mode == "superiority" else -abs(min_delta)
    ok = low > bound
    what = "improvement" if mode == "superiority" else "improvement (non-inferiority margin)"
    reason = (
        f"{what} {sign * interval.difference:+.4f}, {confidence:.0%} CI [{low:+.4f}, {high:+.4f}]; "
        f"lower bound {'>' if ok else '<='} {bound:+.4f}"
    )
    return GateCheck(
        metric,
        "vs_champion",
        Verdict.PASS if ok else Verdict.FAIL,
        reason,
        cand,
        champ,
        threshold=bound,
        ci_low=low,
        ci_high=high,
    )


def _class_guard(candidate: ModelEvidence, champion: ChampionEvidence, policy: GatesSpec) -> list[GateCheck]:
    limit = policy.max_class_recall_drop
    if limit is None or champion.evidence is None:
        return []
    checks = []
    for cls, champ_recall in sorted(champion.evidence.class_recall.items()):
        cand_recall = candidate.class_recall.get(cls)
        if cand_recall is None:
            checks.append(
                GateCheck(
                    f"recall[{cls}]",
                    "class_guard",
                    Verdict.FAIL,
                    "class missing from the candidate's evaluation (fail closed)",
                    champion_value=champ_recall,
                    threshold=limit,
                )
            )
            continue
        drop = champ_recall - cand_recall
        ok = drop <= limit
        checks.append(
            GateCheck(
                f"recall[{cls}]",
                "class_guard",
                Verdict.PASS if ok else Verdict.FAIL,
                f"recall drop {drop:+.4f} {'<=' if ok else '>'} {limit:.4f}",
                cand_recall,
                champ_recall,
                threshold=limit,
            )
        )
    return checks
