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
- a run whose flow run CRASHED with resubmissions left (`RETRAINER_RUN_MAX_RESUBMITS`) is
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
    since: datetime | None = None  # when the flow run entered the state


FlowRunStates = Callable[[Sequence[str]], Mapping[str, FlowRunState]]
"""Prefect's state of each flow run id it has; an id it lacks is left out. Raises when Prefect does
not answer."""
HeardFrom = Callable[[Sequence[str], datetime, datetime], set[str]]
"""Of the flow run ids, those whose process sent a heartbeat between the two instants. Raises when
Prefect does not answer."""
MarkCrashed = Callable[[str, str], bool]
"""Sets a flow run CRASHED with the message; False when Prefect refused (the flow run moved on)."""

CRASHED = "CRASHED"
RUNNING = "RUNNING"
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
    ) -> None:
        self.sessions, self.submit, self.states, self.liveness = sessions, submit, states, liveness
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
        resubmitted: list[str] = []
        failed: list[str] = []
        failures: list[tuple[str, BaseException]] = []
        for run in runs:
            flow_run_id = str(run.prefect_flow_run_id)
            try:
                state, message, _ = self._crash(run) if flow_run_id in zombies else states.get(flow_run_id, GONE_STATE)
                if state not in FINAL_STATES and state != GONE:
                    continue
                if state == CRASHED and attempts_of(run) < self.max_resubmits:
                    if self._resubmit(run, message):
                        resubmitted.append(run.id)
                elif self._fail(run, self._reason(run, state, message)):
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

    def _reason(self, run: e.Run, state: str, message: str) -> str:
        attempts = attempts_of(run)
        tried = f"; submitted {attempts + 1} time(s) (RETRAINER_RUN_MAX_RESUBMITS={self.max_resubmits})"
        if state == GONE:
            return f"Prefect no longer has flow run {run.prefect_flow_run_id}, so nothing will finish the run{tried}"
        said = f": {message}" if message else ""
        if state == CRASHED:
            return f"flow run {run.prefect_flow_run_id} crashed (its process or worker died){said}{tried}"
        return f"flow run {run.prefect_flow_run_id} ended {state} without the run recording a result{said}{tried}"

    def _fail(self, run: e.Run, reason: str) -> bool:
        """Ends the run `failed` if it still is where the pass saw it; whether it did."""
        with transaction(self.sessions) as session:
            row = _still(session, run)
            if row is None:
                return False
            repo.update_run(session, run.id, status=e.RunStatus.FAILED, error=reason)
        log.error("run %s of %s failed: %s", run.id, run.pipeline, reason)
        return True

    def _resubmit(self, run: e.Run, message: str) -> bool:
        """Records the attempt, claims the submission (queued, flow run `submitting`) and submits a
        new flow run. If Prefect does not take it, the run is put back as it was, attempt unrecorded,
        and the next pass tries again with the same idempotency key."""
        crashed = str(run.prefect_flow_run_id)
        with transaction(self.sessions) as session:
            row = _still(session, run)
            if row is None:
                return False
            evidence: dict[str, Any] = dict(row.evidence or {})
            attempt = {"attempt": attempts_of(run) + 1, "crashed_flow_run": crashed, "message": message}
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
            self._end_claim(run.id, restore=run)
            raise
        if not flow_run_id:
            self._end_claim(run.id, restore=run)
            return False
        with transaction(self.sessions) as session:
            session.get_one(SqlRun, run.id).prefect_flow_run_id = flow_run_id
        log.warning(
            "run %s of %s: flow run %s crashed; submitted again as flow run %s (attempt %d of %d)",
            run.id, run.pipeline, crashed, flow_run_id, attempt["attempt"], self.max_resubmits,
        )  # fmt: skip
        return True

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
    return {
        str(flow_run.id): FlowRunState(
            flow_run.state.type.value, flow_run.state.message or "", flow_run.state.timestamp
        )
        for flow_run in found
        if flow_run.state is not None
    }


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


def prefect_reconciler(sessions: sessionmaker[Session], submit: RunSubmitter, settings: Settings) -> Reconciler:
    """The reconciler of `retrainer serve` and `retrainer triggers`: Prefect's API and events, the
    settings' bounds."""
    liveness = Liveness(
        prefect_heard_from, prefect_mark_crashed, settings.run_heartbeat_s, settings.run_heartbeat_misses
    )
    return Reconciler(
        sessions, submit, prefect_flow_run_states, max_resubmits=settings.run_max_resubmits, liveness=liveness
    )
