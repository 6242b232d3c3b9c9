"""People's overrides of the automatic decisions: force-promotion, rollback, freezing.

Each is one transaction that records who did it and why (alias_history, or the pipeline's
freeze); the CLI calls these now and the HTTP API will call the same functions.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from domain import entities as e
from domain.errors import ConflictError, InvalidInputError
from storage import repositories as repo


def _require_reason(reason: str, what: str) -> str:
    if len(reason.strip()) < 10:
        raise InvalidInputError(f"{what} needs a justification of at least 10 characters (--reason)")
    return reason.strip()


def force_promote(session: Session, pipeline: str, version: int, *, actor: str, reason: str) -> e.AliasMove:
    """Makes `version` the champion without the gate, e.g. after a human review of its evidence."""
    reason = _require_reason(reason, "force-promotion")
    target = repo.get_model_version(session, pipeline, version)
    current = repo.get_champion(session, pipeline)
    if current is not None and current.id == target.id:
        raise ConflictError(f"{pipeline} v{version} is already the champion")
    return repo.move_champion(
        session,
        pipeline,
        target.id,
        expected_from_version_id=current.id if current else None,
        actor=f"{actor} (force-promote)",
        reason=reason,
        run_id=target.run_id,
    )


def rollback(session: Session, pipeline: str, *, to_version: int | None, actor: str, reason: str) -> e.AliasMove:
    """Moves the champion back to an earlier champion (the previous one by default); the current
    champion becomes rolled_back."""
    reason = _require_reason(reason, "rollback")
    current = repo.get_champion(session, pipeline)
    if current is None:
        raise ConflictError(f"{pipeline} has no champion to roll back")
    history = repo.alias_history(session, pipeline)
    former = [m.to_version_id for m in history if m.to_version_id is not None and m.to_version_id != current.id]
    if to_version is None:
        if not former:
            raise ConflictError(f"{pipeline} has no earlier champion to roll back to")
        target = repo.get_model_version_by_id(session, former[0])
    else:
        target = repo.get_model_version(session, pipeline, to_version)
        if target.id not in former:
            raise InvalidInputError(
                f"{pipeline} v{to_version} was never a champion; roll back to an earlier champion or force-promote it"
            )
    return repo.move_champion(
        session,
        pipeline,
        target.id,
        expected_from_version_id=current.id,
        actor=f"{actor} (rollback)",
        reason=reason,
        previous_stage=e.ModelStage.ROLLED_BACK,
    )


def freeze(session: Session, pipeline: str, *, until: datetime | None) -> e.Pipeline:
    """Holds automatic promotions until `until` (None lifts the freeze); gates still run."""
    if until is not None and until.tzinfo is None:
        raise InvalidInputError("--until needs a time zone, e.g. 2026-12-24T00:00:00Z")
    return repo.set_freeze(session, pipeline, until)
