"""Approve or reject a run that waits for approval (`promotion.approval` in its spec; flows/approvals.py).

Both need the `operate` scope and a reason of at least 10 characters (400 below that); the actor is
the API key's name. They answer the run's decision record, as GET /api/v1/runs/{run_id} does: 404
for an unknown run, 409 naming the status of a run that does not wait. The routes join the API's
table (`api.routes.add_routes`) when this module is imported, as `api.app` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from pydantic import Field
from sqlalchemy.orm import Session

from api.routes import ApiState, Key, State, _override
from api.schemas import Justification, RunDetail, _Request
from domain import entities as e
from flows import approvals, records
from storage.db import transaction

log = logging.getLogger("retrainer.api")


class ApprovalBody(_Request):
    reason: Justification = Field(
        description="Justification, at least 10 characters (decision record; alias history for a champion move)."
    )


Answer = Callable[[str, ApprovalBody, ApiState, e.ApiKey], RunDetail]


class _Decision(Protocol):
    def __call__(self, session: Session, run_id: str, *, actor: str, reason: str) -> e.Run: ...


def _answer_route(action: str, decide: _Decision, done: str, summary: str, description: str) -> Answer:
    """Adds POST /api/v1/runs/{run_id}/`action` and returns its function: the key's answer (`decide`)
    in one transaction, then the run's decision record (the dashboard calls it too)."""

    def answer(run_id: str, body: ApprovalBody, state: State, key: Key) -> RunDetail:
        with transaction(state.sessions) as session:
            run = decide(session, run_id, actor=key.name, reason=body.reason)
            record = records.decision_record(session, run_id)
        log.info("%s %s run %s (now %s): %s", key.name, done, run_id, run.status.value, body.reason)
        return RunDetail.model_validate(record)

    answer.__name__ = f"{action}_run"  # the OpenAPI operation's id
    return _override(f"/runs/{{run_id}}/{action}", summary, description)(answer)


approve_run = _answer_route(
    "approve",
    approvals.approve,
    "approved",
    "Approve a run that waits for approval",
    "What the gate would have done now proceeds: the canary rollout starts, or the champion moves (actor: the "
    "API key's name, with this reason). A promotion hold or a champion that moved since the evaluation ends the "
    "run skipped or rejected instead (fail closed). Answers the run's decision record; 409 if it does not wait.",
)
reject_run = _answer_route(
    "reject",
    approvals.reject,
    "rejected",
    "Reject a run that waits for approval",
    "The run and its model version end rejected with the API key's name and this reason; the champion is "
    "untouched. Answers the run's decision record; 409 if it does not wait.",
)
