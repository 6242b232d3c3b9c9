"""Gate decisions: one row per metric check of a run's promotion gate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import entities as e
from domain.decisions import gate_event
from storage.orm import SqlGateDecision
from storage.repositories.outbox import record_decision
from storage.repositories.runs import find_run_row


def record_gate_checks(
    session: Session, run_id: str, checks: Sequence[e.GateCheck], *, model_version_id: int | None = None
) -> list[e.GateVerdict]:
    """Stores the gate's checks and its `gate.decided` event (domain/decisions.py), in the caller's transaction."""
    run = find_run_row(session, run_id)
    # A GateCheck's fields are the row's columns, so a new check field needs only a new column.
    columns = [{**asdict(check), "verdict": check.verdict.value} for check in checks]
    rows = [SqlGateDecision(run_id=run_id, model_version_id=model_version_id, **values) for values in columns]
    session.add_all(rows)
    session.flush()
    record_decision(session, gate_event(run.pipeline.name, run_id, checks, model_version_id))
    return [row.to_entity() for row in rows]


def gate_verdicts(session: Session, run_id: str) -> list[e.GateVerdict]:
    query = select(SqlGateDecision).where(SqlGateDecision.run_id == run_id).order_by(SqlGateDecision.id)
    return [row.to_entity() for row in session.scalars(query)]
