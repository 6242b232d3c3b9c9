"""The trigger service: the loop service (`flows/loop.py`) that both `retrainer serve` and
`retrainer triggers` run. Each pass

1. debounces the pending inbox events into runs (`process_pending_events`), submitting each new
   run to its pipeline's Prefect deployment, and
2. re-submits the queued runs whose submission failed earlier (`submit_unsubmitted_runs`): a
   Prefect outage leaves runs queued, never lost, and the first pass after it submits them.

A pass that fails (Prefect or the database does not answer) is retried by the runner with a
back-off; the process never exits for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from flows.triggers import RunSubmitter, process_pending_events, submit_unsubmitted_runs

log = logging.getLogger("retrainer.flows.trigger_service")


@dataclass(frozen=True, slots=True)
class TriggerPass:
    """What one pass did: the runs it created and the earlier runs it submitted."""

    created: tuple[e.Run, ...]
    resubmitted: tuple[str, ...]


class TriggerService:
    """`run_once()`: one debounce + re-submission pass. `submit=None` only creates runs (for a
    deployment where another process submits them)."""

    name = "trigger-service"

    def __init__(self, sessions: sessionmaker[Session], submit: RunSubmitter | None) -> None:
        self.sessions, self.submit = sessions, submit

    def run_once(self) -> TriggerPass:
        created = tuple(r.run for r in process_pending_events(self.sessions, self.submit) if r.created)
        for run in created:
            log.info("run %s for %s from %d events", run.id, run.pipeline, len(run.event_ids))
        resubmitted: tuple[str, ...] = ()
        if self.submit is not None:
            resubmitted = tuple(submit_unsubmitted_runs(self.sessions, self.submit))
            for run_id in resubmitted:
                log.info("run %s submitted after an earlier failed submission", run_id)
        return TriggerPass(created, resubmitted)
