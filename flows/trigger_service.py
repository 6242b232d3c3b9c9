"""The trigger service: the loop service (`flows/loop.py`) that both `retrainer serve` and
`retrainer triggers` run. Each pass

1. debounces the pending inbox events into runs (`process_pending_events`), creating the runs
   only, and
2. submits every queued run that has no flow run yet to its pipeline's Prefect deployment
   (`submit_unsubmitted_runs`): the runs just created, and those whose submission failed earlier.
   A Prefect outage leaves runs queued, never lost, and the first pass after it submits them.

Both steps run even when the first could not finish every dataset; the pass then ends with
`PassIncomplete` naming every dataset and run that failed. The runner retries it with a back-off;
the process never exits for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from flows.loop import PassIncomplete
from flows.triggers import RunSubmitter, process_pending_events, submit_unsubmitted_runs

log = logging.getLogger("retrainer.flows.trigger_service")


@dataclass(frozen=True, slots=True)
class TriggerPass:
    """What one pass did: the runs it created and the runs it submitted."""

    created: tuple[e.Run, ...]
    submitted: tuple[str, ...]


class TriggerService:
    """`run_once()`: one debounce + submission pass. `submit=None` only creates runs (for a
    deployment where another process submits them)."""

    name = "trigger-service"

    def __init__(self, sessions: sessionmaker[Session], submit: RunSubmitter | None) -> None:
        self.sessions, self.submit = sessions, submit

    def run_once(self) -> TriggerPass:
        failures: list[tuple[str, BaseException]] = []
        try:
            created = tuple(r.run for r in process_pending_events(self.sessions) if r.created)
        except PassIncomplete as partial:  # the runs of the other datasets exist: submit them
            created, failures = (), partial.failures
        submitted: tuple[str, ...] = ()
        if self.submit is not None:
            try:
                submitted = tuple(submit_unsubmitted_runs(self.sessions, self.submit))
            except PassIncomplete as partial:
                failures += partial.failures
        if failures:
            raise PassIncomplete("trigger items", failures)
        return TriggerPass(created, submitted)
