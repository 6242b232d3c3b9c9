"""What a passed gate leads to, and the approval gate a spec may put in front of it.

A candidate that passes its gate (flows/pipeline.py) and no promotion hold either goes on at once
(a canary rollout with `canary` and a champion, else the champion moves) or, with
`promotion.approval.required`, waits: the run ends its flow run `awaiting_approval` (no worker held
while it waits), the version's stage is `awaiting_approval` and the champion is untouched. Then:

- `approve` does what the gate would have done, with the hold and the champion re-checked at that
  moment: a hold ends the run `skipped`, a champion that moved since the evaluation ends it
  `rejected` (its evidence is stale); the alias move's actor is the approver, the reason theirs;
- `reject` ends the run `rejected` with the actor and reason;
- `expire_overdue_approvals` (a pass of the canary supervisor, flows/canary.py) rejects each run
  still waiting at its deadline: no answer is a no (fail closed);
- a newer candidate of the pipeline that passes its gate and hold supersedes a waiting one, which
  ends `rejected` ("superseded by run X"): one candidate waits at a time, the newest.

Every decision is in the run's decision record (`outcome.approval`: requested and deadline,
decision, actor, reason, when) and, for a champion move, in the alias history.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import ConflictError
from domain.spec import PipelineSpec, parse_spec
from flows import tracing
from flows.champion import require_reason
from storage import repositories as repo
from storage.db import transaction

log = logging.getLogger("retrainer.flows.approvals")

WAITING = e.RunStatus.AWAITING_APPROVAL
TIMEOUT_ACTOR = "approval timeout"
SUPERSEDE_ACTOR = "supersede"
Outcome = dict[str, Any]
"""A run's outcome as stored in its evidence: status, reason, version and what led there."""


@dataclass(frozen=True, slots=True)
class PassedCandidate:
    """A version that passed its run's gate, and the champion it was judged against."""

    run_id: str
    version: e.ModelVersion
    champion_version_id: int | None
    gate_reason: str


def after_gate(session: Session, spec: PipelineSpec, passed: PassedCandidate, now: datetime | None = None) -> Outcome:
    """The outcome of a passed gate: skipped under a promotion hold, else (after superseding any
    older candidate that waits) waiting for approval, a canary rollout or a champion move."""
    held = promotion_hold(session, spec)
    if held:
        return _outcome(e.RunStatus.SKIPPED, f"gate passed but {held}", passed)
    for older in repo.runs_with_status(session, WAITING, spec.name):
        if older.id != passed.run_id:
            _decline(session, older.id, SUPERSEDE_ACTOR, f"superseded by run {passed.run_id}", "superseded", now)
    if spec.promotion.approval.required:
        return _await_approval(session, spec, passed, now or datetime.now(UTC))
    return carry_out(session, spec, passed, actor="gate", reason=passed.gate_reason, lead="gate passed")


def carry_out(
    session: Session, spec: PipelineSpec, passed: PassedCandidate, *, actor: str, reason: str, lead: str
) -> Outcome:
    """Starts the canary rollout (with `spec.canary` and a champion) or moves the champion by
    compare-and-set from the one the candidate was judged against. `lead` opens the outcome's reason."""
    if (
        spec.canary is not None and passed.champion_version_id is not None
    ):  # a first model has no champion to canary against
        try:
            rollout = repo.start_rollout(
                session,
                spec.name,
                candidate_version_id=passed.version.id,
                champion_version_id=passed.champion_version_id,
                policy=spec.canary.model_dump(mode="json"),
                run_id=passed.run_id,
            )
        except ConflictError as busy:  # one rollout at a time per pipeline (the database says so)
            repo.set_model_stage(session, passed.version.id, e.ModelStage.CANDIDATE)
            return _outcome(e.RunStatus.SKIPPED, f"{lead} but not rolled out: {busy}", passed)
        repo.set_model_stage(session, passed.version.id, e.ModelStage.CANARY)
        steps = ", ".join(f"{s:g}" for s in spec.canary.steps)
        started = f"{lead}; canary rollout {rollout.id} started ({steps} % of traffic)"
        return _outcome(e.RunStatus.CANARY, started, passed) | {"rollout_id": rollout.id}
    try:
        with session.begin_nested(), tracing.span("alias move", to_version=passed.version.version, actor=actor):
            repo.move_champion(
                session,
                spec.name,
                passed.version.id,
                expected_from_version_id=passed.champion_version_id,
                actor=actor,
                reason=reason,
                run_id=passed.run_id,
            )
    except ConflictError as conflict:  # another run promoted since the champion was read: the evidence is stale
        return _stale(session, passed, f"champion changed while this run was evaluating ({conflict})")
    return _outcome(e.RunStatus.PROMOTED, reason if actor == "gate" else f"{lead}: {reason}", passed)


def promotion_hold(session: Session, spec: PipelineSpec) -> str | None:
    """Why promotions of the pipeline are held now (a freeze, a spec's freeze window, the cooldown), or None."""
    now = datetime.now(UTC)
    pipeline = repo.get_pipeline(session, spec.name)
    if pipeline.frozen_until is not None and pipeline.frozen_until > now:
        return f"promotions are frozen until {pipeline.frozen_until.isoformat()}"
    for window in spec.promotion.freeze_windows:
        if window.start <= now < window.end:
            return f"promotions are frozen by the spec until {window.end.isoformat()}"
    if spec.promotion.cooldown_seconds:
        last = repo.last_promotion_at(session, spec.name)
        if last is not None and now - last < timedelta(seconds=spec.promotion.cooldown_seconds):
            ago, cooldown = (now - last).total_seconds(), spec.promotion.cooldown_seconds
            return f"the last promotion was {ago:.0f} s ago (cooldown {cooldown:.0f} s)"
    return None


# ------------------------------------------------------------------------------ decisions


def approve(session: Session, run_id: str, *, actor: str, reason: str, now: datetime | None = None) -> e.Run:
    """A person approves a waiting run: what its gate would have done now proceeds, unless a hold or
    a moved champion stops it (fail closed, the run ends skipped or rejected with the reason).
    ConflictError for a run that does not wait, InvalidInputError for a reason under 10 characters."""
    reason = require_reason(reason, "approving a run")
    run = _waiting(session, run_id, "approve")
    waited = _stored_outcome(run)
    passed = _passed(session, run, waited)
    spec = parse_spec(repo.get_pipeline(session, run.pipeline).spec, source=f"pipeline {run.pipeline}")
    lead = f"approved by {actor}"
    champion = repo.get_champion(session, run.pipeline)
    held = promotion_hold(session, spec)
    if held:
        repo.set_model_stage(session, passed.version.id, e.ModelStage.CANDIDATE)
        outcome = _outcome(e.RunStatus.SKIPPED, f"{lead} but {held}", passed)
    elif (champion.id if champion else None) != passed.champion_version_id:
        now_champion = f"v{champion.version}" if champion else "none"
        outcome = _stale(session, passed, f"champion changed while this run waited for approval (now {now_champion})")
    else:
        outcome = carry_out(session, spec, passed, actor=actor, reason=reason, lead=lead)
    return _finish(session, run, waited, outcome, _decided(waited, "approved", actor, reason, now))


def reject(session: Session, run_id: str, *, actor: str, reason: str, now: datetime | None = None) -> e.Run:
    """A person rejects a waiting run: it ends rejected with their name and reason, the champion untouched."""
    reason = require_reason(reason, "rejecting a run")
    _waiting(session, run_id, "reject")
    return _decline(session, run_id, actor, reason, "rejected", now)


def expire_overdue_approvals(sessions: sessionmaker[Session], now: datetime | None = None) -> list[str]:
    """Rejects every run still waiting for approval at its deadline (one transaction each); returns their ids."""
    now = now or datetime.now(UTC)
    with transaction(sessions) as session:
        overdue = [run.id for run in repo.runs_with_status(session, WAITING) if _deadline(run) <= now]
    expired = []
    for run_id in overdue:
        with transaction(sessions) as session:
            run = repo.lock_run(session, run_id)
            if run.status is not WAITING:  # approved or rejected since the scan
                continue
            deadline = _deadline(run)
            why = f"no approval by the deadline {deadline.isoformat()}; rejected (fail closed)"
            _decline(session, run_id, TIMEOUT_ACTOR, why, "expired", now)
        log.warning("run %s rejected: %s", run_id, why)
        expired.append(run_id)
    return expired


# ------------------------------------------------------------------------------ helpers


def _await_approval(session: Session, spec: PipelineSpec, passed: PassedCandidate, now: datetime) -> Outcome:
    timeout = spec.promotion.approval.timeout_seconds
    deadline = now + timedelta(seconds=timeout)
    repo.set_model_stage(session, passed.version.id, e.ModelStage.AWAITING_APPROVAL)
    how = f"POST /api/v1/runs/{passed.run_id}/approve or /reject, or `retrainer runs approve|reject {passed.run_id}`"
    reason = f"gate passed; awaiting approval until {deadline.isoformat()} ({how})"
    request = {
        "requested_at": now.isoformat(),
        "deadline": deadline.isoformat(),
        "timeout_seconds": timeout,
        "champion_version_id": passed.champion_version_id,
    }
    return _outcome(WAITING, reason, passed) | {"approval": request}


def _outcome(status: e.RunStatus, reason: str, passed: PassedCandidate) -> Outcome:
    return {"status": status, "reason": reason, "version": passed.version.version, "gate_reason": passed.gate_reason}


def _stale(session: Session, passed: PassedCandidate, what: str) -> Outcome:
    repo.set_model_stage(session, passed.version.id, e.ModelStage.REJECTED)
    return _outcome(e.RunStatus.REJECTED, f"{what}; not promoted on stale evidence", passed)


def _waiting(session: Session, run_id: str, action: str) -> e.Run:
    run = repo.lock_run(session, run_id)
    if run.status is not WAITING:
        raise ConflictError(
            f"run {run_id} is {run.status.value}, not awaiting_approval; only a run waiting for approval "
            f"can be {'approved' if action == 'approve' else 'rejected'}"
        )
    return run


def _stored_outcome(run: e.Run) -> Outcome:
    return dict((run.evidence or {}).get("outcome") or {})


def _passed(session: Session, run: e.Run, waited: Outcome) -> PassedCandidate:
    if run.model_version_id is None:  # pragma: no cover - a run waits only after registering its version
        raise ConflictError(f"run {run.id} waits for approval but has no model version")
    version = repo.get_model_version_by_id(session, run.model_version_id)
    request = waited.get("approval") or {}
    return PassedCandidate(run.id, version, request.get("champion_version_id"), str(waited.get("gate_reason") or ""))


def _deadline(run: e.Run) -> datetime:
    """The run's approval deadline; one that is missing or unreadable is already past (fail closed)."""
    stored = (_stored_outcome(run).get("approval") or {}).get("deadline")
    try:
        return datetime.fromisoformat(str(stored))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def _decided(waited: Outcome, decision: str, actor: str, reason: str, now: datetime | None) -> dict[str, Any]:
    when = (now or datetime.now(UTC)).isoformat()
    return {
        **(waited.get("approval") or {}),
        "decision": decision,
        "actor": actor,
        "reason": reason,
        "decided_at": when,
    }


def _decline(session: Session, run_id: str, actor: str, reason: str, decision: str, now: datetime | None) -> e.Run:
    """Ends a waiting run rejected (by a person, the timeout or a newer candidate); its version too."""
    run = repo.lock_run(session, run_id)
    waited = _stored_outcome(run)
    if run.model_version_id is not None:
        repo.set_model_stage(session, run.model_version_id, e.ModelStage.REJECTED)
    why = reason if decision != "rejected" else f"rejected by {actor}: {reason}"
    outcome = {**waited, "status": e.RunStatus.REJECTED, "reason": why}
    return _finish(session, run, waited, outcome, _decided(waited, decision, actor, reason, now))


def _finish(session: Session, run: e.Run, waited: Outcome, outcome: Outcome, decided: dict[str, Any]) -> e.Run:
    status = e.RunStatus(outcome["status"])
    stored = {**outcome, "status": status.value, "gate_reason": waited.get("gate_reason"), "approval": decided}
    log.info("run %s %s by %s: %s", run.id, decided["decision"], decided["actor"], outcome["reason"])
    return repo.update_run(session, run.id, status=status, evidence={"outcome": stored})
