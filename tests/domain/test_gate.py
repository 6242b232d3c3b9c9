"""decide_promotion: pure rules on in-memory numbers."""

from __future__ import annotations

from typing import Any

import pytest

from domain.entities import Verdict
from domain.gate import (
    ChampionEvidence,
    DifferenceInterval,
    GateDecision,
    ModelEvidence,
    decide_promotion,
    min_examples_for,
)
from domain.spec import GatesSpec

POLICY = GatesSpec.model_validate(
    {
        "min": {"accuracy": 0.90},
        "max": {"latency_p99_ms": 5.0},
        "vs_champion": {"accuracy": {"min_delta": 0.0, "confidence": 0.95}, "latency_p99_ms": {"max_ratio": 1.10}},
    }
)


def evidence(accuracy: float = 0.95, latency: float = 1.0, n: int = 300, **recall: float) -> ModelEvidence:
    return ModelEvidence({"accuracy": accuracy, "latency_p99_ms": latency}, {k: v for k, v in recall.items()}, n)


def champion(
    low: float, high: float, *, accuracy: float = 0.93, latency: float = 1.0, confidence: float = 0.95, **recall: float
) -> ChampionEvidence:
    interval = DifferenceInterval("accuracy", (low + high) / 2, low, high, confidence, 300)
    return ChampionEvidence(evidence(accuracy, latency, **recall), {"accuracy": interval})


def verdicts(decision: GateDecision) -> dict[tuple[str, str], Verdict]:
    return {(c.metric, c.check): c.verdict for c in decision.checks}


def test_first_model_is_judged_on_absolute_checks_only() -> None:
    decision = decide_promotion(evidence(), None, POLICY)
    assert decision.passed and decision.first_model
    assert verdicts(decision)[("accuracy", "vs_champion")] is Verdict.SKIPPED
    assert "first model" in decision.reason
    assert decision.checks[-1].check == "overall" and decision.checks[-1].verdict is Verdict.PASS


def test_absolute_floor_and_ceiling() -> None:
    decision = decide_promotion(evidence(accuracy=0.85, latency=7.0), None, POLICY)
    assert not decision.passed
    v = verdicts(decision)
    assert v[("accuracy", "min")] is Verdict.FAIL and v[("latency_p99_ms", "max")] is Verdict.FAIL
    floor = next(c for c in decision.checks if c.check == "min")
    assert floor.candidate_value == 0.85 and floor.threshold == 0.90 and "0.85 < 0.9" in floor.reason


def test_better_candidate_needs_the_interval_above_min_delta() -> None:
    assert decide_promotion(evidence(), champion(0.005, 0.03), POLICY).passed
    decision = decide_promotion(evidence(), champion(-0.004, 0.03), POLICY)
    assert not decision.passed
    check = next(c for c in decision.checks if c.check == "vs_champion" and c.metric == "accuracy")
    assert check.ci_low == pytest.approx(-0.004) and "lower bound <= +0.0000" in check.reason


def test_equal_quality_is_not_promoted_in_superiority_but_is_under_non_inferiority() -> None:
    equal = champion(-0.01, 0.01)
    assert not decide_promotion(evidence(), equal, POLICY).passed
    lenient = GatesSpec.model_validate(
        {
            **POLICY.model_dump(),
            "vs_champion": {
                "accuracy": {"min_delta": 0.02, "confidence": 0.95, "mode": "non_inferiority"},
                "latency_p99_ms": {"max_ratio": 1.10},
            },
        }
    )
    assert decide_promotion(evidence(), equal, lenient).passed
    assert not decide_promotion(evidence(), champion(-0.03, 0.0), lenient).passed


def test_lower_is_better_metrics_flip_the_sign() -> None:
    policy = GatesSpec.model_validate({"vs_champion": {"log_loss": {"min_delta": 0.0}}})
    cand = ModelEvidence({"log_loss": 0.20}, {}, 300)
    # candidate - champion log_loss in [-0.08, -0.02]: the candidate is better
    better = ChampionEvidence(
        ModelEvidence({"log_loss": 0.25}, {}, 300),
        {"log_loss": DifferenceInterval("log_loss", -0.05, -0.08, -0.02, 0.95, 300)},
    )
    assert decide_promotion(cand, better, policy).passed
    worse = ChampionEvidence(
        ModelEvidence({"log_loss": 0.15}, {}, 300),
        {"log_loss": DifferenceInterval("log_loss", 0.05, 0.02, 0.08, 0.95, 300)},
    )
    assert not decide_promotion(cand, worse, policy).passed


def test_latency_ratio_against_the_champion() -> None:
    decision = decide_promotion(evidence(latency=1.5), champion(0.01, 0.03, latency=1.0), POLICY)
    assert not decision.passed
    assert verdicts(decision)[("latency_p99_ms", "vs_champion")] is Verdict.FAIL


def test_too_few_test_examples_is_insufficient_evidence() -> None:
    assert min_examples_for(0.95) == 100 and min_examples_for(0.99) == 500
    decision = decide_promotion(evidence(n=60), champion(0.05, 0.2), POLICY)
    assert not decision.passed
    check = next(c for c in decision.checks if c.check == "vs_champion" and c.metric == "accuracy")
    assert "insufficient evidence" in check.reason and "need >= 100" in check.reason


@pytest.mark.parametrize(
    ("candidate", "champ", "fragment"),
    [
        (ModelEvidence({"latency_p99_ms": 1.0}, {}, 300), None, "metric missing from the evaluation"),
        (evidence(), ChampionEvidence(None, error="sha256 mismatch for s3://m/v1.pt"), "champion unusable: sha256"),
        (evidence(), ChampionEvidence(evidence(), {}), "no paired interval"),
        (evidence(), champion(0.01, 0.02, confidence=0.9), "no paired interval at 95%"),
    ],
)
def test_fail_closed(candidate: ModelEvidence, champ: ChampionEvidence | None, fragment: str) -> None:
    decision = decide_promotion(candidate, champ, POLICY)
    assert not decision.passed
    assert any(fragment in c.reason for c in decision.failed_checks), [c.reason for c in decision.checks]


def test_per_class_recall_guard() -> None:
    policy = GatesSpec.model_validate({**POLICY.model_dump(), "max_class_recall_drop": 0.05})
    cand = evidence(**{"0": 0.99, "1": 0.80})
    ok_champion = champion(0.01, 0.03, **{"0": 0.97, "1": 0.83})
    assert decide_promotion(cand, ok_champion, policy).passed
    decision = decide_promotion(cand, champion(0.01, 0.03, **{"0": 0.97, "1": 0.90}), policy)
    assert not decision.passed
    assert verdicts(decision)[("recall[1]", "class_guard")] is Verdict.FAIL


def test_every_check_carries_numbers_and_a_reason() -> None:
    decision = decide_promotion(evidence(), champion(0.01, 0.03), POLICY)
    for check in decision.checks:
        assert check.reason
    rel: Any = next(c for c in decision.checks if c.check == "vs_champion" and c.metric == "accuracy")
    assert (rel.candidate_value, rel.champion_value, rel.ci_low, rel.ci_high) == (0.95, 0.93, 0.01, 0.03)


# ---------------------------------------------------------------- ranking metrics and metric direction

RANKING_POLICY = GatesSpec.model_validate(
    {"min": {"roc_auc": 0.9}, "vs_champion": {"roc_auc": {"min_delta": 0.0, "confidence": 0.95}}}
)


def ranking(roc_auc: float, low: float = 0.0, high: float = 0.0, *, champ: float = 0.92) -> GateDecision:
    interval = DifferenceInterval("roc_auc", (low + high) / 2, low, high, 0.95, 300, True)
    return decide_promotion(
        ModelEvidence({"roc_auc": roc_auc}, {}, 300),
        ChampionEvidence(ModelEvidence({"roc_auc": champ}, {}, 300), {"roc_auc": interval}),
        RANKING_POLICY,
    )


def test_roc_auc_is_gated_higher_is_better_on_the_paired_interval() -> None:
    better = ranking(0.96, 0.01, 0.05)
    assert better.passed, better.reason
    check = next(c for c in better.checks if c.check == "vs_champion")
    assert check.ci_low == pytest.approx(0.01) and check.ci_high == pytest.approx(0.05)
    worse = ranking(0.91, -0.04, -0.005)
    assert not worse.passed
    assert verdicts(worse) == {
        ("roc_auc", "min"): Verdict.PASS,
        ("roc_auc", "vs_champion"): Verdict.FAIL,
        ("overall", "overall"): Verdict.FAIL,
    }
    assert "lower bound <= +0.0000" in worse.reason
    assert verdicts(ranking(0.85, 0.01, 0.05))[("roc_auc", "min")] is Verdict.FAIL


def test_undefined_ranking_metric_fails_closed_with_the_reason() -> None:
    nan = float("nan")
    decision = ranking(nan, nan, nan)
    assert not decision.passed
    reasons = {c.check: c.reason for c in decision.checks}
    assert "roc_auc is undefined from the evaluation (NaN" in reasons["min"]
    assert "roc_auc is undefined for the candidate (NaN" in reasons["vs_champion"]
    # defined on the full split, but the interval is not (too many one-class resamples)
    interval_undefined = ranking(0.95, nan, nan)
    check = next(c for c in interval_undefined.checks if c.check == "vs_champion")
    assert check.verdict is Verdict.FAIL and "insufficient evidence" in check.reason and "undefined" in check.reason
    assert DifferenceInterval("roc_auc", nan, nan, nan, 0.95, 300, True).to_dict()["ci_low"] is None


def test_a_metric_missing_is_still_reported_as_missing() -> None:
    decision = decide_promotion(ModelEvidence({}, {}, 300), None, RANKING_POLICY)
    assert "metric missing from the evaluation" in decision.reason


@pytest.mark.parametrize(("higher_is_better", "passed"), [(False, True), (True, False), (None, False)])
def test_the_interval_carries_the_direction_of_a_custom_metric(higher_is_better: bool | None, passed: bool) -> None:
    """A custom `error_cost` with `higher_is_better = False`: a drop is an improvement. Without the
    direction (None) the gate falls back to its table, where an unknown name is higher-is-better."""
    policy = GatesSpec.model_validate({"vs_champion": {"error_cost": {"min_delta": 0.0, "confidence": 0.95}}})
    interval = DifferenceInterval("error_cost", -0.3, -0.5, -0.1, 0.95, 300, higher_is_better)
    decision = decide_promotion(
        ModelEvidence({"error_cost": 1.0}, {}, 300),
        ChampionEvidence(ModelEvidence({"error_cost": 1.3}, {}, 300), {"error_cost": interval}),
        policy,
    )
    assert decision.passed is passed, decision.reason
    check = next(c for c in decision.checks if c.check == "vs_champion")
    improvement = (0.1, 0.5) if higher_is_better is False else (-0.5, -0.1)
    assert (check.ci_low, check.ci_high) == pytest.approx(improvement)
