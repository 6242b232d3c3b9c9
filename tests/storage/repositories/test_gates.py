"""Gate decisions, on SQLite and PostgreSQL (the `sessions` fixture)."""

from __future__ import annotations

from dataclasses import asdict

from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from storage import repositories as repo
from tests.storage.repositories.conftest import tx


def test_gate_checks_roundtrip(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    checks = [
        e.GateCheck("accuracy", "min", e.Verdict.PASS, "0.95 >= 0.90", candidate_value=0.95, threshold=0.9),
        e.GateCheck(
            "accuracy",
            "vs_champion",
            e.Verdict.FAIL,
            "CI lower bound -0.01 < 0.0",
            candidate_value=0.95,
            champion_value=0.96,
            ci_low=-0.01,
            ci_high=0.002,
        ),
    ]
    tx(sessions, lambda s: repo.record_gate_checks(s, run.id, checks))
    stored = tx(sessions, lambda s: repo.gate_verdicts(s, run.id))
    assert [(v.metric, v.check, v.verdict, v.ci_low) for v in stored] == [
        ("accuracy", "min", e.Verdict.PASS, None),
        ("accuracy", "vs_champion", e.Verdict.FAIL, -0.01),
    ]


def test_every_field_of_a_gate_check_is_stored(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    check = e.GateCheck(
        "latency_p99_ms", "vs_champion", e.Verdict.PASS, "ratio 1.02 <= 1.10", 4.1, 4.0, 1.1, 0.97, 1.05
    )
    tx(sessions, lambda s: repo.record_gate_checks(s, run.id, [check]))
    [stored] = tx(sessions, lambda s: repo.gate_verdicts(s, run.id))
    assert {name: getattr(stored, name) for name in asdict(check)} == asdict(check)
    assert stored.run_id == run.id
