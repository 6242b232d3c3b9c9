"""`retrainer rollout show` prints the checks of the rollout's latest window with their evidence
(outcome, statistic and limit, interval or p-value, alpha, sample sizes), or the flat checks of a
window stored before the checks were tests."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path

from domain import entities as e
from domain.canary_stats import error_rate_check, prediction_drift_check
from domain.evidence import CanaryAction, CanaryAttempt, CheckEvidence, StepAnalysis, VariantWindow
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.retrainer.test_cli_errors import run_cli
from web.canary_checks import CheckRow

SKEWED = ({"0": 240, "1": 10}, {"0": 120, "1": 130})  # canary predicts almost one class; champion both


def window(
    action: CanaryAction, *, checks: tuple[e.GateCheck, ...] = (), evidence: tuple[CheckEvidence, ...] = ()
) -> CanaryAttempt:
    served = VariantWindow(version="2", requests=250, errors=1)
    return CanaryAttempt(
        action=action,
        reason=f"window {action.value}",
        at=datetime(2026, 11, 23, 11, 0, tzinfo=UTC),
        elapsed_seconds=30.5,
        traffic_percent=25.0,
        canary=served,
        champion=served,
        checks=checks or tuple(c.to_gate_check() for c in evidence),
        evidence=evidence,
    )


def show(tmp_path: Path, *steps: tuple[float, e.Verdict | None, StepAnalysis]) -> str:
    """`rollout show` of a pipeline whose one rollout has these (traffic, verdict, analysis) steps."""
    upgraded = run_cli("db", "upgrade", tmp_path=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    engine = create_db_engine(f"sqlite:///{tmp_path / '.retrainer' / 'retrainer.db'}")
    with transaction(make_sessions(engine)) as s:
        repo.upsert_pipeline(s, "iris", "iris", {})
        uri, digest = "file:///v.pt", "b" * 64
        model = repo.register_model_version(s, "iris", artifact_uri=uri, sha256=digest, size_bytes=2, metrics={})
        rollout = repo.start_rollout(s, "iris", candidate_version_id=model.id, champion_version_id=None, policy={})
        record = functools.partial(repo.record_rollout_step, s, rollout.id)
        for index, (traffic, verdict, analysis) in enumerate(steps):
            finished = verdict is not None
            record(step_index=index, traffic_percent=traffic, verdict=verdict, analysis=analysis, finished=finished)
    engine.dispose()
    shown = run_cli("rollout", "show", "iris", tmp_path=tmp_path, COLUMNS="240")
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def row_of(output: str, check: str) -> list[str]:
    (line,) = [line for line in output.splitlines() if line.startswith("│ " + check + " ")]
    return [cell.strip() for cell in line.strip("│ ").split("│")]


def test_the_latest_windows_checks_show_their_statistics_levels_and_sizes(tmp_path: Path) -> None:
    errors = error_rate_check(1, 250, max_error_rate=0.01, alpha=0.004, final=True)
    drift = prediction_drift_check(*SKEWED, max_psi=0.2, alpha=0.004, final=True)
    old = e.GateCheck("error_rate", "canary", e.Verdict.PASS, "error rate 0.40 % <= 1.00 %", 0.004, None, 0.01)
    first = StepAnalysis(attempts=(window(CanaryAction.ADVANCE, checks=(old,)),), action=CanaryAction.ADVANCE)
    second = StepAnalysis(attempts=(window(CanaryAction.REPEAT, evidence=(errors, drift)),), action=CanaryAction.REPEAT)
    output = show(tmp_path, (10.0, e.Verdict.PASS, first), (25.0, None, second))

    assert "checks of step 2, window 1: repeat" in output
    assert row_of(output, "error_rate") == list(CheckRow.of_evidence(errors).cells)
    assert row_of(output, "error_rate") == [
        "error_rate",
        "pass",
        "rate 0.40 % (limit 1.00 %)",
        "[0.04 %, 3.47 %], p = 0.919",
        "0.004",
        "250",
    ]
    cells = row_of(output, "prediction_drift")
    assert cells[:2] == ["prediction_drift", "fail"] and cells[4:] == ["0.004", "250 / 250"]
    assert drift.statistic is not None and cells[2] == f"PSI {drift.statistic:.3f} (limit 0.200)"
    assert "candidate v1: active" in output


def test_a_window_stored_before_the_tests_shows_its_flat_checks(tmp_path: Path) -> None:
    slow = e.GateCheck("latency_p99_ratio", "canary", e.Verdict.FAIL, "p99 2.97x", 2.97, 3.3, 1.2)
    only = StepAnalysis(attempts=(window(CanaryAction.ROLLBACK, checks=(slow,)),), action=CanaryAction.ROLLBACK)
    output = show(tmp_path, (10.0, e.Verdict.FAIL, only))
    assert row_of(output, "latency_p99_ratio") == [
        "latency_p99_ratio",
        "fail",
        "2.97 (champion 3.3; limit 1.2)",
        "—",
        "—",
        "—",
    ]
