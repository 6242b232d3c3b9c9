"""`retrainer rollout show` reads the typed step analysis (windows analysed, the reason that closed the step)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from domain import entities as e
from domain.evidence import CanaryAction, CanaryAttempt, VariantWindow
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.retrainer.test_cli_errors import run_cli


def attempt(action: CanaryAction, reason: str) -> CanaryAttempt:
    window = VariantWindow(version="2", requests=250)
    at = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    return CanaryAttempt(
        action=action, reason=reason, at=at, elapsed_seconds=31.0, traffic_percent=50.0, canary=window, champion=window
    )


def test_rollout_show_lists_each_step_with_its_windows_and_reason(tmp_path: Path) -> None:
    assert run_cli("db", "upgrade", tmp_path=tmp_path).returncode == 0
    engine = create_db_engine(f"sqlite:///{tmp_path / '.retrainer' / 'retrainer.db'}")
    with transaction(make_sessions(engine)) as s:
        repo.upsert_pipeline(s, "digits", "digits", {"name": "digits"})
        version = repo.register_model_version(
            s, "digits", artifact_uri="file:///m.pt", sha256="a" * 64, size_bytes=1, metrics={}
        )
        rollout = repo.start_rollout(
            s, "digits", candidate_version_id=version.id, champion_version_id=None, policy={"steps": [50, 100]}
        )
        repo.begin_rollout_step(s, rollout.id, traffic_percent=50.0)
        repo.record_step_attempt(s, rollout.id, 0, attempt(CanaryAction.REPEAT, "too few requests"))
        passed = attempt(CanaryAction.ADVANCE, "step 1 passed")
        repo.record_step_attempt(s, rollout.id, 0, passed, verdict=e.Verdict.PASS, next_step=1)
    engine.dispose()

    shown = run_cli("rollout", "show", "digits", tmp_path=tmp_path, COLUMNS="200")
    assert shown.returncode == 0, shown.stderr
    (row,) = [line for line in shown.stdout.splitlines() if "step 1 passed" in line]
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == ["1", "50", "pass", "2", "step 1 passed"]
    assert "candidate v1: active" in shown.stdout
