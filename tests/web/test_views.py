"""web/views.py: the report's frozen views and what they derive."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from domain import entities as e
from domain.evidence import CanaryAction, CanaryAttempt, StepAnalysis, VariantWindow
from web.views import MetricPair, RolloutReport, StepReport

START = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def test_metric_pair_knows_which_direction_is_better() -> None:
    assert MetricPair("accuracy", 0.95, 0.91, True).improved is True
    assert MetricPair("latency_p99_ms", 1.0, 1.1, False).improved is True
    assert MetricPair("latency_p99_ms", 1.2, 1.1, False).improved is False
    assert MetricPair("accuracy", 0.9, 0.9, True).improved is None  # equal: neither
    assert MetricPair("accuracy", 0.9, None, True).delta is None  # no champion: no comparison


def attempt(action: CanaryAction, *checks: e.GateCheck) -> CanaryAttempt:
    return CanaryAttempt(
        action=action,
        reason=action.value,
        at=START,
        elapsed_seconds=30.0,
        traffic_percent=50.0,
        canary=VariantWindow(version="2"),
        champion=VariantWindow(version="1"),
        checks=checks,
    )


def test_a_rollout_lists_every_window_and_check_in_order() -> None:
    ok = e.GateCheck("error_rate", "canary", e.Verdict.PASS, "ok")
    slow = e.GateCheck("latency_p99_ratio", "canary", e.Verdict.FAIL, "slow")
    first = StepAnalysis(attempts=(attempt(CanaryAction.ADVANCE, ok),), action=CanaryAction.ADVANCE)
    second = StepAnalysis(attempts=(attempt(CanaryAction.REPEAT, slow), attempt(CanaryAction.ROLLBACK, ok, slow)))
    steps = (StepReport(0, 10.0, "pass", first, START, START), StepReport(1, 50.0, "fail", second, START, None))
    rollout = RolloutReport(1, None, 2, 1, "rolled_back", "slow", (), START, START + timedelta(minutes=2), steps)
    assert [(s.step_index, n, a.action) for s, n, a in rollout.windows] == [
        (0, 1, CanaryAction.ADVANCE),
        (1, 1, CanaryAction.REPEAT),
        (1, 2, CanaryAction.ROLLBACK),
    ]
    assert [c.metric for *_, c in rollout.checks] == [
        "error_rate",
        "latency_p99_ratio",
        "error_rate",
        "latency_p99_ratio",
    ]
    assert steps[1].decisive is not None and steps[1].decisive.action is CanaryAction.ROLLBACK
    assert StepReport(2, 100.0, None, StepAnalysis(), START, None).decisive is None
