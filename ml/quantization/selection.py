"""Choosing a variant: what each one scored, the rule that picks one, and the report that says why.

`select_variant` is the rule on its own (the fastest variant within the accuracy limit, the float
model on a tie); `quantize_and_select` builds the variants (ml/quantization/transforms.py), scores
each with the caller's evaluator and applies the rule.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
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
class VariantScore(_FieldsAsDict):
    """What the caller's evaluator measured for one variant. accuracy is a fraction (0..1)."""

    accuracy: float
    latency_p50_ms_b32: float
    size_bytes: int

    def __post_init__(self) -> None:
        if not (0.0 <= self.accuracy <= 1.0) or math.isnan(self.accuracy):
            raise InvalidInputError(f"VariantScore.accuracy must be a fraction in [0, 1] (got {self.accuracy})")
        if not (self.latency_p50_ms_b32 > 0.0) or math.isinf(self.latency_p50_ms_b32):
            raise InvalidInputError(f"VariantScore.latency_p50_ms_b32 must be > 0 (got {self.latency_p50_ms_b32})")
        if self.size_bytes < 0:
            raise InvalidInputError(f"VariantScore.size_bytes must be >= 0 (got {self.size_bytes})")


@dataclass(frozen=True)
class VariantResult(_FieldsAsDict):
    """One variant in the report. `reason` says why it is unavailable or ineligible, or what it gains."""

    variant: Variant
    available: bool
    eligible: bool
    reason: str
    score: VariantScore | None = None
    accuracy_drop: float | None = None  # float accuracy minus this variant's, as a fraction
    speedup_b32: float | None = None  # float latency / this variant's latency
    size_ratio: float | None = None  # float size / this variant's size


@dataclass(frozen=True)
class QuantizationReport:
    """Every variant tried, and the one chosen: the fastest whose accuracy drop is within the limit."""

    chosen: Variant
    reason: str
    max_accuracy_drop: float
    results: tuple[VariantResult, ...]

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
            "max_accuracy_drop": self.max_accuracy_drop,
            "results": [result.to_dict() for result in self.results],
        }


@dataclass(frozen=True)
class QuantizationOutcome:
    """The chosen model (an eval-mode CPU copy of the float model when no variant qualifies) and the report."""

    model: nn.Module
    report: QuantizationReport


def select_variant(
    scores: Mapping[Variant, VariantScore], unavailable: Mapping[Variant, str], max_accuracy_drop: float
) -> QuantizationReport:
    """The selection rule on its own: among the float model ("none", always eligible) and every variant
    whose accuracy drop vs float is <= max_accuracy_drop, the lowest batch-32 latency wins; a tie goes to
    the float model (no gain is worth any risk)."""
    if not (0.0 <= max_accuracy_drop <= 1.0):
        raise InvalidInputError(f"max_accuracy_drop must be a fraction in [0, 1] (got {max_accuracy_drop})")
    if "none" not in scores:
        raise InvalidInputError("select_variant needs the float model's score under 'none'")
    baseline = scores["none"]
    results: list[VariantResult] = []
    for variant in VARIANTS:
        if variant in unavailable:
            results.append(VariantResult(variant, available=False, eligible=False, reason=unavailable[variant]))
            continue
        if variant not in scores:
            continue
        score = scores[variant]
        drop = baseline.accuracy - score.accuracy
        speedup = baseline.latency_p50_ms_b32 / score.latency_p50_ms_b32
        size_ratio = baseline.size_bytes / score.size_bytes if score.size_bytes else None
        eligible = drop <= max_accuracy_drop + _DROP_TOLERANCE
        if variant == "none":
            reason = "the float model (baseline)"
        elif eligible:
            reason = f"accuracy drop {_points(drop)} <= {_points(max_accuracy_drop)}; {speedup:.2f}x float speed"
        else:
            reason = f"accuracy drop {_points(drop)} > {_points(max_accuracy_drop)}"
        results.append(VariantResult(variant, True, eligible, reason, score, drop, speedup, size_ratio))

    eligible_results = [r for r in results if r.eligible and r.score is not None]
    best = min(eligible_results, key=lambda r: (cast(VariantScore, r.score).latency_p50_ms_b32, r.variant != "none"))
    return QuantizationReport(best.variant, _why(best, results, max_accuracy_drop), max_accuracy_drop, tuple(results))


def _points(fraction: float) -> str:
    return f"{fraction * 100:.2f} points"


def _why(best: VariantResult, results: list[VariantResult], max_accuracy_drop: float) -> str:
    others = [r for r in results if r.variant != "none"]
    if best.variant != "none":
        score = cast(VariantScore, best.score)
        return (
            f"{best.variant} is the fastest variant within the accuracy limit: {cast(float, best.speedup_b32):.2f}x "
            f"float speed at batch 32 ({score.latency_p50_ms_b32:.3f} ms p50), accuracy drop "
            f"{_points(cast(float, best.accuracy_drop))} <= {_points(max_accuracy_drop)}"
        )
    if not others:
        return "quantization type is none: only the float model was considered"
    parts = []
    for r in others:
        if not r.available:
            parts.append(f"{r.variant} unavailable ({r.reason})")
        elif not r.eligible:
            parts.append(f"{r.variant} lost too much accuracy ({r.reason})")
        else:
            parts.append(f"{r.variant} was not faster ({cast(float, r.speedup_b32):.2f}x float speed)")
    return "kept the float model: " + "; ".join(parts)


def quantize_and_select(
    model: nn.Module,
    *,
    kind: str,
    calibration: Iterable[torch.Tensor],
    evaluate: Callable[[nn.Module], VariantScore],
    max_accuracy_drop: float,
    calibration_batches: int = 16,
) -> QuantizationOutcome:
    """Builds the float model and the variant(s) `kind` names, scores each with `evaluate`, and keeps the
    fastest whose accuracy drop is within `max_accuracy_drop` (a fraction: 0.01 is one point), else the
    float model. Unavailable variants are reported with their reason, never faked."""
    variants = variants_for(kind)
    if calibration_batches < 1:
        raise InvalidInputError(f"calibration_batches must be >= 1 (got {calibration_batches})")
    if not (0.0 <= max_accuracy_drop <= 1.0):
        raise InvalidInputError(f"max_accuracy_drop must be a fraction in [0, 1] (got {max_accuracy_drop})")
    batches = list(itertools.islice(calibration, calibration_batches)) if len(variants) > 1 else []
    models, unavailable = quantize_each(model, variants, batches)
    scores = {variant: evaluate(candidate) for variant, candidate in models.items()}
    report = select_variant(scores, unavailable, max_accuracy_drop)
    return QuantizationOutcome(models[report.chosen], report)
