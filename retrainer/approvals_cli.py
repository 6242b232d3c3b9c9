"""`retrainer runs approve RUN_ID --reason …` and `runs reject`: a person's answer to a run that
waits for approval, in this process's database transaction (flows/approvals.py decides)."""

from __future__ import annotations

from typing import Annotated

import typer

from retrainer.console import out
from retrainer.console import unit_of_work as _unit_of_work

RunId = Annotated[str, typer.Argument(help="The run that waits for approval.")]
Reason = Annotated[str, typer.Option(help="Required justification, at least 10 characters (decision record).")]
Actor = Annotated[str, typer.Option(help="Who is doing this (the alias move's actor on a promotion).")]


def runs_approve(run_id: RunId, reason: Reason, actor: Actor = "cli") -> None:
    """Approve a waiting run: its canary rollout starts or the champion moves (a hold or a moved
    champion ends it skipped or rejected instead)."""
    from flows.approvals import approve

    with _unit_of_work() as session:
        run = approve(session, run_id, actor=actor, reason=reason)
    _print(run.id, run.status.value, run.evidence)


def runs_reject(run_id: RunId, reason: Reason, actor: Actor = "cli") -> None:
    """Reject a waiting run: it ends rejected with your reason; the champion is untouched."""
    from flows.approvals import reject

    with _unit_of_work() as session:
        run = reject(session, run_id, actor=actor, reason=reason)
    _print(run.id, run.status.value, run.evidence)


def _print(run_id: str, status: str, evidence: dict[str, object] | None) -> None:
    outcome = (evidence or {}).get("outcome")
    reason = outcome.get("reason") if isinstance(outcome, dict) else None
    out.print(f"run {run_id}: {status} — {reason or '-'}", highlight=False, soft_wrap=True)


def register(runs_app: typer.Typer) -> None:
    """Adds these commands to `retrainer runs`."""
    runs_app.command("approve")(runs_approve)
    runs_app.command("reject")(runs_reject)
