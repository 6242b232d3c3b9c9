"""The trigger service: the loop service (`flows/loop.py`) that both `retrainer serve` and
`retrainer triggers` run. Each pass

1. debounces the pending inbox events into runs (`process_pending_events`), creating the runs
   only, and
2. submits every queued run that has no flow run yet to its pipeline's Prefect deployment
   (`submit_unsubmitted_runs`): the runs just created, and those whose submission failed earlier.
   A Prefect outage leaves runs queued, never lost, and the first pass after it submits them.
3. with a `Reconciler` (flows/reconcile.py), at most every few seconds, settles the runs whose flow
   run ended while the run did not (its worker died): submitted again to resume from their
   checkpoint, or ended `failed` with the reason. It runs in the submission loop.

Both steps run even when the first could not finish every dataset; the pass then ends with
`PassIncomplete` naming every dataset and run that failed. The runner retries it with a back-off;
the process never exits for it.

`run_forever` runs a pass as soon as the consumer stores events (`storage/notify.py`: an in-process
wake-up inside `retrainer serve`, PostgreSQL LISTEN/NOTIFY across processes), and at the latest
every `interval_s` (the fallback, and all there is across processes on SQLite), so with
`debounce_seconds: 0` a run is created and submitted within milliseconds of the insert.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from flows.loop import LoopHealth, PassIncomplete, run_loop
from flows.reconcile import Reconciler
from flows.triggers import RunSubmitter, process_pending_events, submit_unsubmitted_runs
from storage.notify import INBOX_CHANNEL, Wakeup, Wakeups

log = logging.getLogger("retrainer.flows.trigger_service")


@dataclass(frozen=True, slots=True)
class TriggerPass:
    """What one pass did: the runs it created and the runs it submitted."""

    created: tuple[e.Run, ...]
    submitted: tuple[str, ...]


class TriggerService:
    """`run_once()`: one debounce + submission (+ reconciliation) pass. `submit=None` only creates
    runs (for a deployment where another process submits them)."""

    name = "trigger-service"

    def __init__(
        self, sessions: sessionmaker[Session], submit: RunSubmitter | None, reconciler: Reconciler | None = None
    ) -> None:
        self.sessions, self.submit, self.reconciler = sessions, submit, reconciler
        self.wakeups = Wakeups(sessions, INBOX_CHANNEL)

    def run_forever(self, stop: threading.Event, *, interval_s: float, health: LoopHealth | None = None) -> None:
        """Passes until `stop` is set: on every inbox wake-up, and every `interval_s` without one.

        Creating runs and submitting them are two loops (two threads): a submission waits on Prefect
        (tens of ms), and an event that arrives meanwhile must not wait for it to become a run. The
        creation loop hands the runs it created to the submission loop (`_Handoff`); both report into
        `health`, which holds the failure of either until that loop passes again."""
        health = health or LoopHealth.for_interval(self.name, interval_s)
        if self.submit is None:  # runs only: another process submits them
            with self.wakeups:
                run_loop(_Creation(self, None), stop, interval_s=interval_s, health=health, pause=self._pause)
            return
        handoff, parts = _Handoff(), _SharedHealth(health)
        submissions = _Submission(self, handoff)
        thread = threading.Thread(
            target=run_loop,
            args=(submissions, stop),
            kwargs={"interval_s": interval_s, "health": parts.part("submission"), "pause": submissions.pause},
            name="trigger-submission",
            daemon=True,
        )
        thread.start()
        try:
            with self.wakeups:
                creation = _Creation(self, handoff)
                run_loop(creation, stop, interval_s=interval_s, health=parts.part("creation"), pause=self._pause)
        finally:
            thread.join(timeout=30)

    def _pause(self, stop: threading.Event, seconds: float) -> None:
        self.wakeups.wakeup.wait(seconds, stop)

    def create_runs(self) -> tuple[tuple[e.Run, ...], list[tuple[str, BaseException]]]:
        """Step 1: (the runs created, the datasets that failed)."""
        try:
            return tuple(r.run for r in process_pending_events(self.sessions) if r.created), []
        except PassIncomplete as partial:  # the runs of the other datasets exist: submit them
            return (), partial.failures

    def submit_runs(self, first: Sequence[e.Run] = ()) -> tuple[tuple[str, ...], list[tuple[str, BaseException]]]:
        """Step 2: (the runs submitted, the runs whose submission failed); `first`, runs just created,
        before the others."""
        if self.submit is None:
            return (), []
        try:
            return tuple(submit_unsubmitted_runs(self.sessions, self.submit, first)), []
        except PassIncomplete as partial:
            return (), partial.failures

    def reconcile_runs(self, *, when_due: bool = False) -> list[tuple[str, BaseException]]:
        """Step 3, if the service has a reconciler (and, `when_due`, its interval has passed): the
        runs (or the Prefect query) that failed."""
        if self.submit is None or self.reconciler is None or (when_due and not self.reconciler.due()):
            return []
        try:
            self.reconciler.run_once()
        except PassIncomplete as partial:
            return partial.failures
        return []

    def run_once(self) -> TriggerPass:
        """All steps, one after the other (`--once`, and tests)."""
        created, failures = self.create_runs()
        submitted, more = self.submit_runs(created)
        more += self.reconcile_runs()
        if failures or more:
            raise PassIncomplete("trigger items", failures + more)
        return TriggerPass(created, submitted)


class _Handoff:
    """The runs the creation loop made, waiting for the submission loop, and the wake-up that says so:
    the submission loop submits them without querying for them first."""

    def __init__(self) -> None:
        self.runs, self.wakeup = deque[e.Run](), Wakeup()

    def put(self, runs: Sequence[e.Run]) -> None:
        self.runs.extend(runs)
        self.wakeup.set()

    def take(self) -> list[e.Run]:
        return [self.runs.popleft() for _ in range(len(self.runs))]  # deque pops are thread-safe


class _Creation:
    """The creation loop's pass: debounce the inbox into runs, then hand them to the submission loop."""

    name = TriggerService.name

    def __init__(self, service: TriggerService, handoff: _Handoff | None) -> None:
        self.service, self.handoff = service, handoff

    def run_once(self) -> None:
        runs, failures = self.service.create_runs()
        if runs and self.handoff is not None:
            self.handoff.put(runs)
        if failures:
            raise PassIncomplete("datasets", failures)


class _Submission:
    """The submission loop's pass: submit every queued run without a flow run, then reconcile (when due)."""

    name = "trigger-submission"

    def __init__(self, service: TriggerService, handoff: _Handoff) -> None:
        self.service, self.handoff = service, handoff

    def run_once(self) -> None:
        _, failures = self.service.submit_runs(self.handoff.take())
        failures += self.service.reconcile_runs(when_due=True)
        if failures:
            raise PassIncomplete("runs", failures)

    def pause(self, stop: threading.Event, seconds: float) -> None:
        self.handoff.wakeup.wait(seconds, stop)


class _SharedHealth:
    """One LoopHealth (what /healthz probes) fed by two loops: failing while either's last pass
    failed, passing once both last passed."""

    def __init__(self, health: LoopHealth) -> None:
        self.health, self.failing, self.lock = health, dict[str, BaseException](), threading.Lock()

    def part(self, name: str) -> LoopHealth:
        return _PartHealth(f"{self.health.name}/{name}", stale_after_s=self.health.stale_after_s, shared=self)

    def report(self, part: str, error: BaseException | None) -> None:
        with self.lock:
            if error is None:
                self.failing.pop(part, None)
            else:
                self.failing[part] = error
            if self.failing:
                self.health.failed(next(iter(self.failing.values())))
            else:
                self.health.passed()


@dataclass
class _PartHealth(LoopHealth):
    """One loop's health, reported into the `_SharedHealth` it belongs to."""

    shared: _SharedHealth | None = None

    def passed(self) -> None:
        assert self.shared is not None
        self.shared.report(self.name, None)

    def failed(self, error: BaseException) -> None:
        assert self.shared is not None
        self.shared.report(self.name, error)
