"""The canary evidence models and the one place the rollout's traffic share comes from."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from domain import entities as e
from domain.evidence import CanaryAction, CanaryAttempt, ModelStats, StepAnalysis, VariantWindow
from domain.spec import CanarySpec

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def rollout(status: e.RolloutStatus, current_step: int, policy: dict[str, Any]) -> e.Rollout:
    return e.Rollout(1, "digits", None, 2, 1, status, current_step, policy, None, NOW, None)


@pytest.mark.parametrize(
    ("status", "step", "percent"),
    [
        (e.RolloutStatus.ACTIVE, 0, 10.0),  # the first step's share from the moment the rollout starts
        (e.RolloutStatus.ACTIVE, 1, 50.0),
        (e.RolloutStatus.ACTIVE, 7, 100.0),  # past the last step: stays at the last
        (e.RolloutStatus.PROMOTED, 1, 100.0),
        (e.RolloutStatus.ROLLED_BACK, 1, 0.0),
        (e.RolloutStatus.ABORTED, 0, 0.0),
    ],
)
def test_traffic_percent_comes_from_the_stored_step(status: e.RolloutStatus, step: int, percent: float) -> None:
    assert rollout(status, step, {"steps": [10, 50, 100]}).traffic_percent == percent


def test_an_empty_stored_policy_is_the_default_plan_as_the_controller_reads_it() -> None:
    # the model server and the controller read the same policy, so they can never disagree on the share
    assert rollout(e.RolloutStatus.ACTIVE, 0, {}).traffic_percent == CanarySpec().steps[0] == 10.0


def test_stats_answer_parses_and_gives_each_variant_its_window() -> None:
    served = {"pipeline": "digits", "requests": 10, "errors": 1, "latency_p99_ms": 4.0, "future_field": True}
    stats = ModelStats.model_validate(
        {
            "name": "digits",
            "champion": {"version": "1", "weight": 90},
            "canary": {"version": "2", "weight": 10},
            "window_seconds": 30,
            "variants": [
                served | {"variant": "champion", "version": "1"},
                served | {"variant": "canary", "version": "2"},
            ],
        }
    )
    canary = stats.window("canary", 2)
    assert type(canary) is VariantWindow and canary.error_rate == 0.1 and canary.accuracy is None
    assert stats.window("champion", None) == VariantWindow()  # no champion version: nothing to compare
    shadow = {"pipeline": "digits", "variant": "shadow", "requests": 1}
    with pytest.raises(ValidationError):
        ModelStats.model_validate(
            {"name": "digits", "champion": None, "canary": None, "window_seconds": 30} | {"variants": [shadow]}
        )


def test_an_attempt_round_trips_through_json_and_counts_repeats() -> None:
    check = e.GateCheck("error_rate", "canary", e.Verdict.FAIL, "0.0200 > 0.0100", 0.02, 0.0, 0.01)
    repeat = CanaryAttempt(
        action=CanaryAction.REPEAT,
        reason="failure 1/2: error_rate",
        at=NOW,
        elapsed_seconds=31.0,
        traffic_percent=10.0,
        canary=VariantWindow(version="2", requests=200, errors=4),
        champion=VariantWindow(version="1", requests=1800),
        checks=(check,),
    )
    stored = StepAnalysis(attempts=(repeat, repeat), action=CanaryAction.REPEAT, reason=repeat.reason)
    again = StepAnalysis.model_validate(stored.model_dump(mode="json"))
    assert again == stored and again.repeats == 2 and again.decisive == repeat
    assert again.attempts[0].checks[0].verdict is e.Verdict.FAIL
    aborted = StepAnalysis.model_validate({"attempts": [], "action": "aborted", "reason": "by alice"})
    assert aborted.action is e.RolloutStatus.ABORTED and aborted.decisive is None
    with pytest.raises(ValidationError):
        CanaryAttempt.model_validate(repeat.model_dump(mode="json") | {"at": "2026-11-23T10:00:00"})  # no zone
