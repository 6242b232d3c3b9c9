"""Choosing a variant: what each one scored, the rule that picks one, and the report that says why.

The budget is a limit on how much worse one named metric of the task may get (`MetricBudget`:
`accuracy` by 0.01, `rmse` by 0.5, ...; `max_accuracy_drop=` is the accuracy budget). The rule,
`select_variant`: among the float model and every variant within the budget, the fastest at batch 32
wins, the float model on a tie. Fastest, not most accurate: the budget already says how much quality
the pipeline gives up, and within it speed is what a variant is for; a tie keeps float (no gain is
worth any risk). `quantize_and_select` builds the variants (ml/quantization/transforms.py), scores
each with the caller's evaluator and applies the rule.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from domain.errors import InvalidInputError
from ml.quantization.transforms import quantize_each
from ml.quantization.variants import VARIANTS, Variant, variants_for

# Differences below this are float noise from subtracting accuracies (0.96 - 0.95 > 0.01 in binary).
_DROP_TOLERANCE = 1e-9


class _FieldsAsDict:
    """`to_dict` for the frozen dataclasses below, whose fields are all JSON-safe."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(cast(Any, self))


@dataclass(frozen=True)
class MetricBudget(_FieldsAsDict):
    """How much one metric may get worse than the float model's: a "drop" is a fall in a metric where
    higher is better, a rise in one where lower is better (`MetricBudget("rmse", 0.5, False)`)."""

    metric: str
    max_drop: float
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise InvalidInputError(f"MetricBudget.metric must name a metric (got {self.metric!r})")
        if not (self.max_drop >= 0.0) or math.isinf(self.max_drop):
            raise InvalidInputError(f"MetricBudget.max_drop for {self.metric} must be >= 0 (got {self.max_drop})")
        if self.metric == "accuracy" and self.max_drop > 1.0:
            raise InvalidInputError(f"max_accuracy_drop must be a fraction in [0, 1] (got {self.max_drop})")

    def drop(self, baseline: float, value: float) -> float:
        """How much worse `value` is than `baseline` (negative: better)."""
        return baseline - value if self.higher_is_better else value - baseline

    def describe(self, amount: float) -> str:
        # Accuracy reads in points, as the spec's max_accuracy_drop always has; other metrics in their units.
        return f"{amount * 100:.2f} points" if self.metric == "accuracy" else f"{amount:.4g}"


def budget_from(max_accuracy_drop: float | None, budget: MetricBudget | None) -> MetricBudget:
    """The one budget a caller gave: `max_accuracy_drop` (accuracy, higher is better) or `budget`."""
    if (max_accuracy_drop is None) == (budget is None):
        raise InvalidInputError("give exactly one of max_accuracy_drop and budget (a MetricBudget)")
    if budget is not None:
        return budget
    return MetricBudget("accuracy", cast(float, max_accuracy_drop), higher_is_better=True)


@dataclass(frozen=True)
class VariantScore(_FieldsAsDict):
    """What the caller's evaluator measured for one variant. `accuracy` (a fraction, 0..1) is one of
    the metrics; `metrics` holds any others (rmse, roc_auc, ...) by name. Keep `accuracy` None for a
    task without it."""

    accuracy: float | None
    latency_p50_ms_b32: float
    size_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.accuracy is not None and (not (0.0 <= self.accuracy <= 1.0) or math.isnan(self.accuracy)):
            raise InvalidInputError(f"VariantScore.accuracy must be a fraction in [0, 1] (got {self.accuracy})")
        if not (self.latency_p50_ms_b32 > 0.0) or math.isinf(self.latency_p50_ms_b32):
            raise InvalidInputError(f"VariantScore.latency_p50_ms_b32 must be > 0 (got {self.latency_p50_ms_b32})")
        if self.size_bytes < 0:
            raise InvalidInputError(f"VariantScore.size_bytes must be >= 0 (got {self.size_bytes})")
        for name, value in self.metrics.items():
            if math.isnan(value):
                raise InvalidInputError(f"VariantScore.metrics[{name!r}] is NaN; a budget cannot be judged on it")

    def metric(self, name: str) -> float:
        """The named metric's value; InvalidInputError naming the metrics there are."""
        if name == "accuracy" and self.accuracy is not None:
            return self.accuracy
        if name in self.metrics:
            return self.metrics[name]
        known = sorted({*self.metrics, *(["accuracy"] if self.accuracy is not None else [])})
        raise InvalidInputError(
            f"the quantization budget is on {name!r}, which the evaluator did not report (it gave {known}); "
            "budget a metric the task computes"
        )


@dataclass(frozen=True)
class VariantResult(_FieldsAsDict):
    """One variant in the report. `reason` says why it is unavailable or ineligible, or what it gains."""

    variant: Variant
    available: bool
    eligible: bool
    reason: str
    score: VariantScore | None = None
    drop: float | None = None  # how much worse the budget's metric is than float's (MetricBudget.drop)
    speedup_b32: float | None = None  # float latency / this variant's latency
    size_ratio: float | None = None  # float size / this variant's size


@dataclass(frozen=True)
class QuantizationReport:
    """Every variant tried, and the one chosen: the fastest whose drop in the budget's metric is within it."""

    chosen: Variant
    reason: str
    budget: MetricBudget
    results: tuple[VariantResult, ...]

    @property
    def max_accuracy_drop(self) -> float | None:
        return self.budget.max_drop if self.budget.metric == "accuracy" else None

    def result(self, variant: Variant) -> VariantResult:
        for result in self.results:
            if result.variant == variant:
                return result
        raise InvalidInputError(
            f"variant {variant!r} was not tried (tried: {', '.join(r.variant for r in self.results)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "reason": self.reason,
            "metric": self.budget.metric,
            "higher_is_better": self.budget.higher_is_better,
            "max_drop": self.budget.max_drop,
            # Kept for readers of reports written before the budget named its metric.
            "max_accuracy_drop": self.max_accuracy_drop,
            "results": [result.to_dict() for result in self.results],
        }


@dataclass(frozen=True)
class QuantizationOutcome:
    """The chosen model (an eval-mode CPU copy of the float model when no variant qualifies) and the report."""

    model: nn.Module
    report: QuantizationReport


def select_variant(
    scores: Mapping[Variant, VariantScore],
    unavailable: Mapping[Variant, str],
    max_accuracy_drop: float | None = None,
    *,
    budget: MetricBudget | None = None,
) -> QuantizationReport:
    """The selection rule on its own: among the float model ("none", always eligible) and every variant
    whose drop in the budget's metric vs float is <= its max_drop, the lowest batch-32 latency wins; a tie
    goes to the float model. Give the budget as `max_accuracy_drop` (a fraction) or as `budget`."""
    limit = budget_from(max_accuracy_drop, budget)
    if "none" not in scores:
        raise InvalidInputError("select_variant needs the float model's score under 'none'")
    baseline = scores["none"]
    reference = baseline.metric(limit.metric)
    results: list[VariantResult] = []
    for variant in VARIANTS:
        if variant in unavailable:
            results.append(VariantResult(variant, available=False, eligible=False, reason=unavailable[variant]))
            continue
        if variant not in scores:
            continue
        score = scores[variant]
        drop = limit.drop(reference, score.metric(limit.metric))
        speedup = baseline.latency_p50_ms_b32 / score.latency_p50_ms_b32
        size_ratio = baseline.size_bytes / score.size_bytes if score.size_bytes else None
        eligible = drop <= limit.max_drop + _DROP_TOLERANCE
        verdict = (
            f"{limit.metric} drop {limit.describe(drop)} {'<=' if eligible else '>'} {limit.describe(limit.max_drop)}"
        )
        if variant == "none":
            reason = "the float model (baseline)"
        elif eligible:
            reason = f"{verdict}; {speedup:.2f}x float speed"
        else:
            reason = verdict
        results.append(VariantResult(variant, True, eligible, reason, score, drop, speedup, size_ratio))

    eligible_results = [r for r in results if r.eligible and r.score is not None]
    best = min(eligible_results, key=lambda r: (cast(VariantScore, r.score).latency_p50_ms_b32, r.variant != "none"))
    return QuantizationReport(best.variant, _why(best, results, limit), limit, tuple(results))


def _why(best: VariantResult, results: list[VariantResult], budget: MetricBudget) -> str:
    others = [r for r in results if r.variant != "none"]
    if best.variant != "none":
        score = cast(VariantScore, best.score)
        return (
            f"{best.variant} is the fastest variant within the {budget.metric} budget: "
            f"{cast(float, best.speedup_b32):.2f}x float speed at batch 32 ({score.latency_p50_ms_b32:.3f} ms p50), "
            f"{budget.metric} drop {budget.describe(cast(float, best.drop))} <= {budget.describe(budget.max_drop)}"
        )
    if not others:
        return "quantization type is none: only the float model was considered"
    parts = []
    for r in others:
        if not r.available:
            parts.append(f"{r.variant} unavailable ({r.reason})")
        elif not r.eligible:
            parts.append(f"{r.variant} lost too much {budget.metric} ({r.reason})")
        else:
            parts.append(f"{r.variant} was not faster ({cast(float, r.speedup_b32):.2f}x float speed)")
    return "kept the float model: " + "; ".join(parts)


def quantize_and_select(
    model: nn.Module,
    *,
    kind: str,
    calibration: Iterable[torch.Tensor],
    evaluate: Callable[[nn.Module], VariantScore],
    max_accuracy_drop: float | None = None,
    budget: MetricBudget | None = None,
    calibration_batches: int = 16,
) -> QuantizationOutcome:
    """Builds the float model and the variant(s) `kind` names, scores each with `evaluate`, and keeps the
    fastest within the budget, else the float model: `max_accuracy_drop` (a fraction: 0.01 is one point
    of accuracy) or `budget` (any metric `evaluate` reports, with its direction). Unavailable variants
    are reported with their reason, never faked."""
    variants = variants_for(kind)
    if calibration_batches < 1:
        raise InvalidInputError(f"calibration_batches must be >= 1 (got {calibration_batches})")
    limit = budget_from(max_accuracy_drop, budget)
    batches = list(itertools.islice(calibration, calibration_batches)) if len(variants) > 1 else []
    models, unavailable = quantize_each(model, variants, batches)
    scores = {variant: evaluate(candidate) for variant, candidate in models.items()}
    report = select_variant(scores, unavailable, budget=limit)
    return QuantizationOutcome(models[report.chosen], report)
