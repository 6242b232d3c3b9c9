"""web/views.py: the report's frozen views and what they derive."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from domain import entities as e
from domain.canary_stats import error_rate_check
from domain.evidence import CanaryAction, CanaryAttempt, CheckEvidence, StepAnalysis, VariantWindow
from web.views import (
    Interval,
    MetricPair,
    RolloutReport,
    StepReport,
    compared_metrics,
    model_metric_columns,
    task_named,
)

START = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def test_metric_pair_knows_which_direction_is_better() -> None:
    assert MetricPair("accuracy", 0.95, 0.91, True).improved is True
    assert MetricPair("latency_p99_ms", 1.0, 1.1, False).improved is True
    assert MetricPair("latency_p99_ms", 1.2, 1.1, False).improved is False
    assert MetricPair("accuracy", 0.9, 0.9, True).improved is None  # equal: neither
    assert MetricPair("accuracy", 0.9, None, True).delta is None  # no champion: no comparison


def attempt(action: CanaryAction, *checks: e.GateCheck, evidence: tuple[CheckEvidence, ...] = ()) -> CanaryAttempt:
    return CanaryAttempt(
        action=action,
        reason=action.value,
        at=START,
        elapsed_seconds=30.0,
        traffic_percent=50.0,
        canary=VariantWindow(version="2"),
        champion=VariantWindow(version="1"),
        checks=checks,
        evidence=evidence,
    )


def test_a_rollout_lists_every_window_and_check_in_order() -> None:
    # the first window was stored before the checks were tests (flat checks, old names); the others
    # carry each check's evidence, which the rows show instead of the flat checks
    old_slow = e.GateCheck("latency_p99_ratio", "canary", e.Verdict.FAIL, "slow")
    passed = error_rate_check(1, 400, max_error_rate=0.01, alpha=0.005, final=True)
    failed = error_rate_check(30, 400, max_error_rate=0.01, alpha=0.005, final=True)
    first = StepAnalysis(attempts=(attempt(CanaryAction.ADVANCE, old_slow),), action=CanaryAction.ADVANCE)
    second = StepAnalysis(
        attempts=(
            attempt(CanaryAction.REPEAT, failed.to_gate_check(), evidence=(failed,)),
            attempt(CanaryAction.ROLLBACK, evidence=(passed, failed)),
        )
    )
    steps = (StepReport(0, 10.0, "pass", first, START, START), StepReport(1, 50.0, "fail", second, START, None))
    policy = (("confidence", "0.95"), ("steps", "10.0 → 50.0 → 100.0"))
    rollout = RolloutReport(1, None, 2, 1, "rolled_back", "slow", policy, START, START + timedelta(minutes=2), steps)
    assert [(s.step_index, n, a.action) for s, n, a in rollout.windows] == [
        (0, 1, CanaryAction.ADVANCE),
        (1, 1, CanaryAction.REPEAT),
        (1, 2, CanaryAction.ROLLBACK),
    ]
    assert [(c.check, c.outcome, c.alpha, c.canary_n) for *_, c in rollout.checks] == [
        ("latency_p99_ratio", "fail", None, None),
        ("error_rate", "fail", 0.005, 400),
        ("error_rate", "pass", 0.005, 400),
        ("error_rate", "fail", 0.005, 400),
    ]
    assert rollout.false_rollback_budget is not None and abs(rollout.false_rollback_budget - 0.05) < 1e-12
    assert steps[1].decisive is not None and steps[1].decisive.action is CanaryAction.ROLLBACK
    assert StepReport(2, 100.0, None, StepAnalysis(), START, None).decisive is None


def test_a_policy_without_a_usable_confidence_has_no_budget() -> None:
    def budget(policy: tuple[tuple[str, str], ...]) -> float | None:
        return RolloutReport(1, None, 2, 1, "active", None, policy, START, None, ()).false_rollback_budget

    assert budget(()) is None  # stored before the checks were tests
    assert budget((("confidence", "high"),)) is None
    assert budget((("confidence", "1.5"),)) is None
    assert budget((("confidence", "0.99"),)) is not None


def test_the_compared_metrics_are_the_tasks_own_then_the_costs() -> None:
    assert [name for name, _ in compared_metrics("regression")] == [
        "rmse",
        "mae",
        "r2",
        "mape",
        "latency_p99_ms",
        "size_bytes",
    ]
    assert dict(compared_metrics("regression"))["r2"] is True and dict(compared_metrics("regression"))["rmse"] is False
    assert {name for name, _ in compared_metrics("classification")} >= {"accuracy", "roc_auc", "pr_auc"}
    assert (task_named("regression"), task_named(None), task_named("ranking")) == (
        "regression",
        "classification",  # stored before specs named a task
        "classification",
    )


def test_a_paired_interval_speaks_only_when_it_excludes_zero_in_the_metrics_direction() -> None:
    def says(low: float | None, high: float | None, higher_is_better: bool) -> bool | None:
        return MetricPair("m", 1.0, 1.0, higher_is_better, Interval(low, high, 0.95)).interval_says

    assert says(-2.0, -0.5, higher_is_better=False) is True  # rmse fell for sure
    assert says(0.5, 2.0, higher_is_better=False) is False
    assert says(0.01, 0.02, higher_is_better=True) is True
    assert says(-0.5, 0.5, higher_is_better=False) is None  # holds 0: no verdict
    assert says(None, 0.5, higher_is_better=True) is None  # undefined bound
    assert MetricPair("rmse", 10.0, 12.0, False).interval_says is None  # not compared


def test_model_list_columns_are_the_recorded_quality_metrics_of_the_task() -> None:
    regression = {"rmse": 3.0, "mae": 2.0, "r2": 0.8, "mape": None, "latency_p99_ms": 0.4}
    assert model_metric_columns("regression", [("regression", regression)]) == ("rmse", "mae", "r2")
    classifier = {"accuracy": 0.9, "roc_auc": 0.95, "size_bytes": 10}
    assert model_metric_columns(None, [(None, classifier)]) == ("accuracy", "roc_auc")
    assert model_metric_columns("regression", []) == ("rmse",)  # nothing recorded: the headline
    assert model_metric_columns(None, [(None, {})]) == ("accuracy",)
