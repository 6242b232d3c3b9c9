"""Moves of the champion alias and ends of canary rollouts, automatic and by people.

People's overrides (force-promotion, rollback, freezing, aborting or promoting a rollout) each run
in the caller's transaction and record who did it and why (alias_history, the rollout's reason, the
pipeline's freeze); the CLI and the HTTP API call the same functions. `end_rollout` and
`promote_candidate` are also how the canary controller finishes a rollout.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from domain import entities as e
from domain.errors import ConflictError, InvalidInputError
from storage import repositories as repo

MIN_REASON_CHARS = 10  # an operator's justification, once stripped (the API schema states it too)
# What "stripped" strips: ASCII whitespace only. Python's str.strip() also takes control characters
# such as \x1c and JSON Schema's \s (ECMA 262) takes no-break spaces: a rule the schema states must
# mean the same in both, so neither's \s is used.
BLANK = " \t\n\r\f\v"
FILLED = r"[^ \t\n\r\f\v]"  # the regex of a character BLANK does not hold, read alike by Python and ECMA 262


def require_reason(reason: str, what: str) -> str:
    if len(reason.strip(BLANK)) < MIN_REASON_CHARS:
        raise InvalidInputError(f"{what} needs a justification of at least {MIN_REASON_CHARS} characters (--reason)")
    return reason.strip(BLANK)


def force_promote(session: Session, pipeline: str, version: int, *, actor: str, reason: str) -> e.AliasMove:
    """Makes `version` the champion without the gate, e.g. after a human review of its evidence."""
    reason = require_reason(reason, "force-promotion")
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
    reason = require_reason(reason, "rollback")
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
        # The alias history decides, not the request's shape: a conflict with the state (409), like "no champion".
        if target.id == current.id:
            raise ConflictError(f"{pipeline} v{to_version} is the champion already; roll back to an earlier champion")
        if target.id not in former:
            raise ConflictError(
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


def end_rollout(session: Session, rollout: e.Rollout, status: e.RolloutStatus, reason: str) -> e.Rollout:
    """Rollback, abort or failure: the rollout stops being active (the model server drops the canary,
    weight 0), the candidate becomes rolled_back and its run ends rolled_back with the reason."""
    ended = repo.finish_rollout(session, rollout.id, status, reason)
    repo.set_model_stage(session, rollout.candidate_version_id, e.ModelStage.ROLLED_BACK)
    _finish_run(session, rollout, e.RunStatus.ROLLED_BACK, reason)
    return ended


def promote_candidate(
    session: Session, rollout: e.Rollout, *, actor: str, reason: str, fail_on_conflict: bool = True
) -> e.Rollout:
    """Moves the champion alias to the rollout's candidate by compare-and-set from the champion the
    rollout started against (the old one is retired) and ends the rollout and its run `promoted`.

    If the champion moved since, the canary's evidence compared against the wrong model: with
    `fail_on_conflict` the rollout ends `failed` (the candidate is not promoted); without, the
    ConflictError is raised and the rollout is left as it was."""
    try:
        with session.begin_nested():
            repo.move_champion(
                session,
                rollout.pipeline,
                rollout.candidate_version_id,
                expected_from_version_id=rollout.champion_version_id,
                actor=actor,
                reason=reason,
                run_id=rollout.run_id,
            )
    except ConflictError as conflict:
        if not fail_on_conflict:
            raise
        stale = f"not promoted: the champion changed during the rollout ({conflict}); its evidence is stale"
        return end_rollout(session, rollout, e.RolloutStatus.FAILED, stale)
    ended = repo.finish_rollout(session, rollout.id, e.RolloutStatus.PROMOTED, reason)
    _finish_run(session, rollout, e.RunStatus.PROMOTED, reason)
    return ended


def _finish_run(session: Session, rollout: e.Rollout, status: e.RunStatus, reason: str) -> None:
    if rollout.run_id is None:
        return
    run = repo.get_run(session, rollout.run_id)
    if run.status.is_final:
        return
    canary = {"rollout_id": rollout.id, "status": status.value, "reason": reason}
    gate = dict((run.evidence or {}).get("outcome") or {})
    outcome = {**gate, "status": status.value, "reason": reason, "gate_reason": gate.get("reason")}
    repo.update_run(session, rollout.run_id, status=status, evidence={"canary": canary, "outcome": outcome})


def _active(session: Session, pipeline: str, what: str) -> e.Rollout:
    rollout = repo.active_rollout(session, pipeline)
    if rollout is None:
        raise ConflictError(
            f"{pipeline} has no active canary rollout to {what}; see GET /api/v1/pipelines/{pipeline}/rollout"
        )
    return rollout


def abort_rollout(session: Session, pipeline: str, *, actor: str, reason: str) -> e.Rollout:
    """Stops the active rollout now: canary weight 0, candidate rolled_back, champion untouched."""
    reason = require_reason(reason, "aborting a rollout")
    return end_rollout(
        session, _active(session, pipeline, "abort"), e.RolloutStatus.ABORTED, f"aborted by {actor}: {reason}"
    )


def promote_rollout(session: Session, pipeline: str, *, actor: str, reason: str) -> e.Rollout:
    """Promotes the active rollout's candidate now, without waiting for the remaining steps."""
    reason = require_reason(reason, "promoting a rollout by hand")
    rollout = _active(session, pipeline, "promote")
    return promote_candidate(
        session,
        rollout,
        actor=f"{actor} (manual promote)",
        reason=f"promoted by {actor}: {reason}",
        fail_on_conflict=False,
    )


def freeze(session: Session, pipeline: str, *, until: datetime | None) -> e.Pipeline:
    """Holds automatic promotions until `until` (None lifts the freeze); gates still run."""
    if until is not None and until.tzinfo is None:
        raise InvalidInputError("--until needs a time zone, e.g. 2026-12-24T00:00:00Z")
    return repo.set_freeze(session, pipeline, until)
