"""The run reconciler: a run is never `running` for ever because the process behind it died.

A flow run whose process dies (its Prefect worker SIGKILLed, the machine lost) ends CRASHED in
Prefect, and Prefect starts nothing again. The flow's own handler leaves such a run as it was
(flows/pipeline.py: a crash is not the code failing), and a pass of `Reconciler` settles it:

- it reads a bounded page of runs in progress (`queued` or `running`) that have a flow run and are
  older than `grace_s`, continuing after the last page on the next pass, so every run is looked at
  however many are in progress;
- asks Prefect, in one request, for those flow runs' states;
- with a `Liveness`, a flow run still RUNNING whose process sent Prefect no heartbeat
  (`prefect.flow-run.heartbeat`, every `RETRAINER_RUN_HEARTBEAT_S`, the PREFECT_FLOWS_HEARTBEAT_FREQUENCY
  Retrainer sets on the flows it launches) for `RETRAINER_RUN_HEARTBEAT_MISSES` beats is a zombie: its
  process died with its worker and nothing reported it. The pass sets it CRASHED in Prefect, naming
  the silence, and it is settled as any crashed flow run below;
- with a `StartBound`, a flow run that never started is lost: PENDING for longer than
  `RETRAINER_RUN_START_TIMEOUT_S` (a worker took it and died while starting it: Prefect's PENDING
  proposal came, RUNNING never will) or SCHEDULED that long past its time (no worker of its pool took
  it). The pass reads its state again, cancels it in Prefect (state CANCELLED named `NeverStarted`:
  Prefect refuses PENDING after CANCELLED, so a worker that took it since does not start it) and
  settles it as a crashed one. The bound is the trade-off: Prefect still accepts RUNNING after
  CANCELLED, so a process a live but slow worker starts after the bound runs beside the resubmission,
  and a run that waits longer than the bound for a free worker of a busy pool (at its concurrency
  limit) is taken for lost too: the bound must exceed both waits;
- a run whose flow run CRASHED (or never started) with resubmissions left (`RETRAINER_RUN_MAX_RESUBMITS`) is
  submitted again as a new flow run, whose train task resumes from the run's newest checkpoint in
  the artifact store. The attempt is recorded in the run's evidence (`resubmits`) before the
  submission, and `flows.triggers.submission_key` makes it Prefect's idempotency key
  (`{run_id}:{attempt}`), so a submission retried after a lost answer is still one flow run;
- any other final flow run (CRASHED with none left, FAILED, CANCELLED, COMPLETED) or one Prefect no
  longer has ends the run `failed`, naming the flow run, its state and the attempts.

Each change is a compare-and-set on the run's (status, flow run id): a run that moved on meanwhile
(the flow recorded its verdict) is left alone. Prefect not answering fails the pass
(`PassIncomplete`, retried) and changes nothing. The trigger service runs a pass from its
submission loop (flows/trigger_service.py) at most every `every_s`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import literal, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.settings import Settings
from flows.loop import PassIncomplete, describe
from flows.triggers import DeploymentNotFoundError, RunSubmitter, attempts_of
from storage import repositories as repo
from storage.db import transaction
from storage.orm import SqlRun, utcnow
from storage.repositories.runs import SUBMITTING

log = logging.getLogger("retrainer.flows.reconcile")


class FlowRunState(NamedTuple):
    type: str
    message: str = ""
    since: datetime | None = None  # when the flow run entered the state; SCHEDULED: when it was due
    name: str = ""  # Prefect's state name (Late, NeverStarted, ...)


FlowRunStates = Callable[[Sequence[str]], Mapping[str, FlowRunState]]
"""Prefect's state of each flow run id it has; an id it lacks is left out. Raises when Prefect does
not answer."""
HeardFrom = Callable[[Sequence[str], datetime, datetime], set[str]]
"""Of the flow run ids, those whose process sent a heartbeat between the two instants. Raises when
Prefect does not answer."""
MarkCrashed = Callable[[str, str], bool]
"""Sets a flow run CRASHED with the message; False when Prefect refused (the flow run moved on)."""
MarkNeverStarted = Callable[[str, str], bool]
"""Cancels a flow run that never started (state CANCELLED named `NEVER_STARTED`) with the message;
False when Prefect refused (the flow run moved on)."""

CRASHED = "CRASHED"
RUNNING = "RUNNING"
CANCELLED = "CANCELLED"
NOT_STARTED = frozenset({"PENDING", "SCHEDULED"})
NEVER_STARTED = "NeverStarted"  # the name of the CANCELLED state a pass gives a flow run that never started
HEARTBEAT = "prefect.flow-run.heartbeat"
FINAL_STATES = frozenset({CRASHED, "FAILED", "CANCELLED", "COMPLETED"})
GONE = "GONE"  # stands in the state of a flow run Prefect no longer has
GONE_STATE = FlowRunState(GONE)
# The statuses a flow run still owes a verdict to; a canary or one awaiting approval has ended its
# flow run on purpose, and someone else moves it on.
ON_A_FLOW_RUN = (e.RunStatus.QUEUED.value, e.RunStatus.RUNNING.value)


@dataclass(frozen=True, slots=True)
class ReconcilePass:
    """What one pass did: the runs submitted again and the runs it ended `failed`."""

    resubmitted: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Liveness:
    """How a RUNNING flow run shows that its process lives: a heartbeat every `beat_s`; `misses` beats
    in a row unheard make it a zombie. `beat_s` must not be shorter than the flows' own interval."""

    heard_from: HeardFrom
    mark_crashed: MarkCrashed
    beat_s: float = 180.0
    misses: int = 3

    @property
    def silence(self) -> timedelta:
        return timedelta(seconds=self.beat_s * self.misses)

    def reason(self) -> str:
        return (
            f"its process sent no heartbeat for {self.silence.total_seconds():g} s (RETRAINER_RUN_HEARTBEAT_S="
            f"{self.beat_s:g} x RETRAINER_RUN_HEARTBEAT_MISSES={self.misses}): it died without reporting it"
        )


@dataclass(frozen=True, slots=True)
class StartBound:
    """How long a flow run may take to start: PENDING, or SCHEDULED past its time, for longer than
    `timeout_s` it is lost. `timeout_s` must exceed the longest start a live worker takes (polling,
    image pull, pod scheduling) and the longest wait for a free worker the pools' concurrency allows."""

    mark_never_started: MarkNeverStarted
    timeout_s: float = 600.0

    def reason(self, state: str) -> str:
        why = (
            "the worker that took it died while starting it (Prefect's PENDING came, RUNNING never did)"
            if state == "PENDING"
            else "no worker of its pool took it: none runs, or all stayed busy that long"
        )
        late = " past its time" if state == "SCHEDULED" else ""
        return f"it stayed {state}{late} for more than {self.timeout_s:g} s (RETRAINER_RUN_START_TIMEOUT_S): {why}"


class Reconciler:
    """One pass (`run_once`) settles the runs whose flow run ended while the run did not; `due()`
    says whether `every_s` has passed since the last one (the trigger service asks)."""

    name = "run-reconciler"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        submit: RunSubmitter,
        states: FlowRunStates,
        *,
        max_resubmits: int = 1,
        grace_s: float = 30.0,
        page: int = 100,
        every_s: float = 5.0,
        liveness: Liveness | None = None,
        start_bound: StartBound | None = None,
    ) -> None:
        self.sessions, self.submit, self.states, self.liveness = sessions, submit, states, liveness
        self.start_bound = start_bound
        self.max_resubmits, self.grace = max_resubmits, timedelta(seconds=grace_s)
        self.page, self.every_s = page, every_s
        self._after: tuple[datetime, str] | None = None  # where the next page starts
        self._last = float("-inf")

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def run_once(self, now: datetime | None = None) -> ReconcilePass:
        self._last = time.monotonic()
        now = now or datetime.now(UTC)
        runs = self._next_page(now)
        if not runs:
            return ReconcilePass()
        ids = [str(run.prefect_flow_run_id) for run in runs]
        try:
            states = self.states(ids)
            zombies = self._silent(states, now)
        except Exception as error:  # no answer is no evidence: nothing changes, the pass is retried
            self._after = None
            raise PassIncomplete(
                f"of {len(runs)} runs to reconcile", [("Prefect flow run states and heartbeats", error)]
            ) from error
        stalled = self._stalled(states, now)
        resubmitted: list[str] = []
        failed: list[str] = []
        failures: list[tuple[str, BaseException]] = []
        for run in runs:
            flow_run_id = str(run.prefect_flow_run_id)
            try:
                if flow_run_id in zombies:
                    state = self._crash(run)
                elif flow_run_id in stalled:
                    state = self._give_up(run, now)
                else:
                    state = states.get(flow_run_id, GONE_STATE)
                if state.type not in FINAL_STATES and state.type != GONE:
                    continue
                if _lost(state) and attempts_of(run) < self.max_resubmits:
                    if self._resubmit(run, state):
                        resubmitted.append(run.id)
                elif self._fail(run, self._reason(run, state)):
                    failed.append(run.id)
            except Exception as error:
                log.warning("run %s of %s not reconciled: %s", run.id, run.pipeline, describe(error))
                failures.append((f"run {run.id} ({run.pipeline})", error))
        if failures:
            raise PassIncomplete(f"of {len(runs)} runs to reconcile", failures)
        return ReconcilePass(tuple(resubmitted), tuple(failed))

    def _silent(self, states: Mapping[str, FlowRunState], now: datetime) -> set[str]:
        """The flow runs RUNNING for longer than the silence that sent no heartbeat within it; none
        without a `Liveness`."""
        if self.liveness is None:
            return set()
        silence = self.liveness.silence
        running = [
            i for i, s in states.items() if s.type == RUNNING and s.since is not None and s.since < now - silence
        ]
        if not running:
            return set()
        # a beat stamped a little ahead (the flow's clock) still counts
        return set(running) - self.liveness.heard_from(running, now - silence, now + silence)

    def _stalled(self, states: Mapping[str, FlowRunState], now: datetime) -> set[str]:
        """The flow runs PENDING, or SCHEDULED past their time, for longer than the start bound; none
        without a `StartBound`."""
        if self.start_bound is None:
            return set()
        return {i for i, s in states.items() if self._overdue(s, now)}

    def _overdue(self, state: FlowRunState, now: datetime) -> bool:
        assert self.start_bound is not None
        bound = now - timedelta(seconds=self.start_bound.timeout_s)
        return state.type in NOT_STARTED and state.since is not None and state.since < bound

    def _give_up(self, run: e.Run, now: datetime) -> FlowRunState:
        """Cancels the run's flow run that never started in Prefect; the state the pass then settles
        (the one Prefect now has if the flow run started or ended since the pass read it)."""
        assert self.start_bound is not None and run.prefect_flow_run_id is not None
        flow_run_id = run.prefect_flow_run_id
        # read again just before: Prefect has no compare-and-set on a state and would cancel a flow
        # run that started since; this narrows that window from the pass's length to one request
        seen = self.states([flow_run_id]).get(flow_run_id, GONE_STATE)
        if not self._overdue(seen, now):
            return seen
        reason = self.start_bound.reason(seen.type)
        if self.start_bound.mark_never_started(flow_run_id, reason):
            log.warning("run %s of %s: flow run %s %s", run.id, run.pipeline, flow_run_id, reason)
            return FlowRunState(CANCELLED, reason, name=NEVER_STARTED)
        return FlowRunState(seen.type)

    def _crash(self, run: e.Run) -> FlowRunState:
        """Sets the run's silent flow run CRASHED in Prefect; the state the pass then settles (the
        state Prefect keeps if it refused: the flow run moved on meanwhile)."""
        assert self.liveness is not None and run.prefect_flow_run_id is not None
        reason = self.liveness.reason()
        if self.liveness.mark_crashed(run.prefect_flow_run_id, reason):
            log.warning("run %s of %s: flow run %s %s", run.id, run.pipeline, run.prefect_flow_run_id, reason)
            return FlowRunState(CRASHED, reason)
        return FlowRunState(RUNNING)

    def _next_page(self, now: datetime) -> list[e.Run]:
        """The next `page` runs in progress with a flow run, older than the grace period, in
        (created_at, id) order (the runs' index); after the last page the next pass starts over."""
        query = (
            select(SqlRun)
            .where(
                SqlRun.status.in_(ON_A_FLOW_RUN),
                SqlRun.prefect_flow_run_id.is_not(None),
                SqlRun.prefect_flow_run_id != SUBMITTING,
                SqlRun.created_at < now - self.grace,
            )
            .order_by(SqlRun.created_at, SqlRun.id)
            .limit(self.page)
        )
        if self._after is not None:
            after = tuple_(literal(self._after[0], SqlRun.created_at.type), literal(self._after[1], SqlRun.id.type))
            query = query.where(tuple_(SqlRun.created_at, SqlRun.id) > after)
        with transaction(self.sessions) as session:
            runs = [row.to_entity() for row in session.scalars(query)]
        self._after = (runs[-1].created_at, runs[-1].id) if len(runs) == self.page else None
        return runs

    def _reason(self, run: e.Run, state: FlowRunState) -> str:
        attempts = attempts_of(run)
        tried = f"; submitted {attempts + 1} time(s) (RETRAINER_RUN_MAX_RESUBMITS={self.max_resubmits})"
        if state.type == GONE:
            return f"Prefect no longer has flow run {run.prefect_flow_run_id}, so nothing will finish the run{tried}"
        said = f": {state.message}" if state.message else ""
        if state.type == CRASHED:
            return f"flow run {run.prefect_flow_run_id} crashed (its process or worker died){said}{tried}"
        if _lost(state):
            return f"flow run {run.prefect_flow_run_id} never started{said}{tried}"
        return f"flow run {run.prefect_flow_run_id} ended {state.type} without the run recording a result{said}{tried}"

    def _fail(self, run: e.Run, reason: str) -> bool:
        """Ends the run `failed` if it still is where the pass saw it; whether it did."""
        with transaction(self.sessions) as session:
            row = _still(session, run)
            if row is None:
                return False
            repo.update_run(session, run.id, status=e.RunStatus.FAILED, error=reason)
        log.error("run %s of %s failed: %s", run.id, run.pipeline, reason)
        return True

    def _resubmit(self, run: e.Run, ended: FlowRunState) -> bool:
        """Records the attempt, claims the submission (queued, flow run `submitting`) and submits a
        new flow run. If Prefect refuses it, the run is put back as it was, attempt unrecorded, and the
        next pass tries again with the same idempotency key; if the call fails (its outcome unknown), the
        run waits queued, attempt recorded, for the trigger service's submission pass (the same key)."""
        crashed = str(run.prefect_flow_run_id)
        with transaction(self.sessions) as session:
            row = _still(session, run)
            if row is None:
                return False
            evidence: dict[str, Any] = dict(row.evidence or {})
            # `crashed_flow_run` names a flow run that never started too: the key readers know
            attempt = {"attempt": attempts_of(run) + 1, "crashed_flow_run": crashed, "message": ended.message}
            evidence["resubmits"] = [*evidence.get("resubmits", []), {**attempt, "at": utcnow().isoformat()}]
            row.evidence, row.status = evidence, e.RunStatus.QUEUED.value
            row.prefect_flow_run_id, row.submission_claimed_at = SUBMITTING, utcnow()
            claimed = row.to_entity()
        try:
            flow_run_id = self.submit(claimed)
        except DeploymentNotFoundError as missing:
            self._end_claim(run.id, restore=None, error=missing.message)
            raise
        except BaseException:
            # Prefect may have made the flow run and lost the answer: the run waits queued with this attempt
            # (the same idempotency key) for the trigger service's submission pass, which gets that flow run
            # or makes it; put back on the crashed one, a new flow run that started would find the run taken.
            self._release(run.id)
            raise
        if not flow_run_id:
            self._end_claim(run.id, restore=run)
            return False
        with transaction(self.sessions) as session:
            if not repo.record_submission(session, run.id, flow_run_id):
                log.warning("run %s: another flow run took it while flow run %s was submitted", run.id, flow_run_id)
                return False
        log.warning(
            "run %s of %s: flow run %s %s; submitted again as flow run %s (attempt %d of %d)",
            run.id, run.pipeline, crashed, "crashed" if ended.type == CRASHED else "never started", flow_run_id,
            attempt["attempt"], self.max_resubmits,
        )  # fmt: skip
        return True

    def _release(self, run_id: str) -> None:
        with transaction(self.sessions) as session:
            repo.release_submission(session, run_id)

    def _end_claim(self, run_id: str, *, restore: e.Run | None, error: str | None = None) -> None:
        """A resubmission that did not happen: back to the crashed flow run (`restore`), or failed."""
        with transaction(self.sessions) as session:
            row = session.get_one(SqlRun, run_id)
            if restore is None:
                row.prefect_flow_run_id = None
                repo.update_run(session, run_id, status=e.RunStatus.FAILED, error=error)
                return
            row.status, row.prefect_flow_run_id = restore.status.value, restore.prefect_flow_run_id
            row.evidence, row.submission_claimed_at = restore.evidence, None


def _lost(state: FlowRunState) -> bool:
    """Whether the flow run ended because its process or worker was lost (crashed, or never started):
    the run is submitted again while attempts last."""
    return state.type == CRASHED or (state.type == CANCELLED and state.name == NEVER_STARTED)


def _still(session: Session, run: e.Run) -> SqlRun | None:
    """The run's row, locked, if it is still in progress on the flow run the pass saw."""
    # OF runs: the row joins its pipeline (outer), whose side PostgreSQL refuses to lock
    row = session.get(SqlRun, run.id, with_for_update={"of": SqlRun})
    if row is None or row.status not in ON_A_FLOW_RUN or row.prefect_flow_run_id != run.prefect_flow_run_id:
        return None
    return row


def prefect_flow_run_states(ids: Sequence[str]) -> dict[str, FlowRunState]:
    """`FlowRunStates` from the Prefect API (PREFECT_API_URL), in one request. An id that is not a
    UUID cannot be a flow run: it is left out (gone)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    wanted = []
    for flow_run_id in ids:
        try:
            wanted.append(uuid.UUID(flow_run_id))
        except ValueError:
            continue
    if not wanted:
        return {}
    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=wanted)), limit=len(wanted))
    return {str(flow_run.id): _seen(flow_run.state) for flow_run in found if flow_run.state is not None}


def _seen(state: Any) -> FlowRunState:
    """A Prefect state as the reconciler reads it; a SCHEDULED one is as old as it is late."""
    since = state.timestamp
    if state.type.value == "SCHEDULED" and state.state_details.scheduled_time is not None:
        since = state.state_details.scheduled_time
    return FlowRunState(state.type.value, state.message or "", since, state.name or "")


def prefect_heard_from(ids: Sequence[str], since: datetime, until: datetime) -> set[str]:
    """`HeardFrom` from Prefect's events: the newest heartbeat of each flow run (one request per 50,
    the events API's page)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    heard: set[str] = set()
    with get_client(sync_client=True) as client:
        for start in range(0, len(ids), 50):
            resources = [f"prefect.flow-run.{flow_run_id}" for flow_run_id in ids[start : start + 50]]
            page = client.read_events(
                filter=EventFilter(
                    occurred=EventOccurredFilter(since=since, until=until),
                    event=EventNameFilter(name=[HEARTBEAT]),
                    resource=EventResourceFilter(id=resources, distinct=True),
                ),
                limit=len(resources),
            )
            heard.update(event.resource.id.removeprefix("prefect.flow-run.") for event in page.events)
    return heard


def prefect_mark_crashed(flow_run_id: str, message: str) -> bool:
    """`MarkCrashed` through the Prefect API: proposed, not forced, so a flow run that ended meanwhile
    keeps its own final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        status = client.set_flow_run_state(uuid.UUID(flow_run_id), Crashed(message=message)).status
    return bool(status == SetStateStatus.ACCEPT)


def prefect_mark_never_started(flow_run_id: str, message: str) -> bool:
    """`MarkNeverStarted` through the Prefect API: proposed, not forced, so a flow run that ended
    meanwhile keeps its final state; CANCELLED, which Prefect never lets go back to PENDING, so a
    worker that took the flow run since cannot start it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        cancelled: State[Any] = Cancelled(message=message, name=NEVER_STARTED)
        status = client.set_flow_run_state(uuid.UUID(flow_run_id), cancelled).status
    return bool(status == SetStateStatus.ACCEPT)


def prefect_reconciler(sessions: sessionmaker[Session], submit: RunSubmitter, settings: Settings) -> Reconciler:
    """The reconciler of `retrainer serve` and `retrainer triggers`: Prefect's API and events, the
    settings' bounds."""
    liveness = Liveness(
        prefect_heard_from, prefect_mark_crashed, settings.run_heartbeat_s, settings.run_heartbeat_misses
    )
    return Reconciler(
        sessions,
        submit,
        prefect_flow_run_states,
        max_resubmits=settings.run_max_resubmits,
        liveness=liveness,
        start_bound=StartBound(prefect_mark_never_started, settings.run_start_timeout_s),
    )
