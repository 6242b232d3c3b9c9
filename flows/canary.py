"""The canary controller: walks a pipeline's active rollout step by step until it is promoted or
rolled back (`canary_rollout`, a Prefect flow; `drive_rollout` is the same loop without Prefect).

Each pass reads the rollout from SQL, opens its step in progress if needed, asks the model server
to apply it (`POST /v2/repository/models/{pipeline}/load`: the server re-reads the canary weight
from SQL), reads both variants' window since the step began, summed over every replica that
reports to the metadata database (`flows/fleet.py`; a replica gone silent delays a pass, never
makes one), or from the one server's `GET /v2/models/{pipeline}/stats` when none reports, and
lets `domain.canary.next_canary_step` decide, with each check a statistical test whose evidence is
stored with the window (the drift check allows the candidate/champion disagreement the gate
measured on the same test rows, read from the run's evidence; the pipeline spec's `task` decides
the delayed-label check: accuracy, or a regression model's mean absolute error):

- wait: keep looking (interval not over, or too few requests before the deadline);
- repeat: a check failed below the failure limit; the step restarts on a fresh window;
- advance: the step passed; the next step (higher weight) becomes the one in progress;
- promote: the last step passed; the champion alias moves to the candidate by compare-and-set,
  the old champion is retired, the rollout and its run end `promoted`;
- rollback: weight 0 at once, candidate stage `rolled_back`, rollout and run `rolled_back`, reason
  stored.

Every decision is one transaction, and the step in progress and its start time live in SQL, so a
controller killed at any point resumes at the same step and the same window: no step is skipped or
analysed twice. A manual abort or promotion (API/CLI) ends the rollout; the controller notices on
its next pass and stops. If the model server cannot be read, the window counts as empty, which
fails closed at the step's deadline.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.apikeys import CONTROLLER_KEY_NAME, Scope
from domain.canary import CanaryAction, CanaryStep, CanaryWindow, RolloutProgress, next_canary_step
from domain.errors import ConflictError, InfrastructureError, TransientInfraError
from domain.evidence import CanaryAttempt, ModelStats
from domain.logcontext import log_context
from domain.spec import CanarySpec
from domain.task import Task
from flows.approvals import expire_overdue_approvals
from flows.champion import end_rollout, promote_candidate
from flows.context import FlowContext
from flows.fleet import MISSING_AFTER_S, FleetWindow, heard_since, read_fleet_window
from flows.loop import PassIncomplete
from flows.tracing import run_traceparent, span
from storage import repositories as repo
from storage.db import transaction
from web.canary_checks import markdown_table

log = logging.getLogger("retrainer.flows.canary")


class ServingClient:
    """The two model-server calls the controller makes, over HTTP (the server may be another process)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}  # an `operate` key: stats and load need one
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise TransientInfraError(f"model server {self.base_url} not reachable ({err})") from err
        if response.status_code != 200:
            raise TransientInfraError(
                f"model server {self.base_url}{path}: HTTP {response.status_code} {response.text}"
            )
        answer: dict[str, Any] = response.json()
        return answer

    def load(self, pipeline: str) -> dict[str, Any]:
        return self._call("POST", f"/v2/repository/models/{pipeline}/load")

    def stats(self, pipeline: str, window_seconds: float) -> ModelStats:
        answer = self._call(
            "GET", f"/v2/models/{pipeline}/stats", params={"window_seconds": max(window_seconds, 0.001)}
        )
        try:
            return ModelStats.model_validate(answer)
        except ValidationError as err:
            raise InfrastructureError(
                f"model server {self.base_url}: its stats answer is not a model server's window ({err}); "
                "check that the serving URL points at a Retrainer model server of this version"
            ) from err

    def close(self) -> None:
        self._http.close()


@dataclass(frozen=True, slots=True)
class RolloutResult:
    rollout_id: int
    status: e.RolloutStatus
    reason: str
    steps: tuple[e.RolloutStep, ...]


# What a pass saw and decided, for progress reporting: (rollout, decision, attempt record).
StepListener = Callable[[e.Rollout, CanaryStep, CanaryAttempt], None]


def _attempt(
    decision: CanaryStep, window: CanaryWindow, server_error: str | None, fleet: FleetWindow | None = None
) -> CanaryAttempt:
    return CanaryAttempt(
        action=decision.action,
        reason=decision.reason,
        at=datetime.now(UTC),
        elapsed_seconds=round(window.elapsed_seconds, 3),
        traffic_percent=decision.traffic_percent,
        canary=window.canary,
        champion=window.champion,
        checks=decision.checks,
        evidence=decision.evidence,
        server_error=server_error,
        replicas=fleet.shares if fleet is not None else (),
        missing_replicas=fleet.missing if fleet is not None else (),
    )


def expected_disagreement(run: e.Run | None, champion_version: int | None) -> float | None:
    """The rate at which the gate saw the candidate and this champion disagree on the same test rows
    (`run.evidence["disagreement"]`), or None when the run measured none against this champion."""
    recorded = (run.evidence or {}).get("disagreement") if run is not None else None
    if not isinstance(recorded, dict) or champion_version is None:
        return None
    rate = recorded.get("rate")
    if recorded.get("champion_version") != champion_version or not isinstance(rate, int | float):
        return None
    return float(rate) if 0.0 <= rate <= 1.0 else None


def pipeline_task(pipeline: e.Pipeline) -> Task:
    """The task of the pipeline's stored spec (classification when the spec predates `task`)."""
    return "regression" if pipeline.spec.get("task") == "regression" else "classification"


def _failures(rollout: e.Rollout) -> int:
    """Failed analyses so far (each repeated window counts one), from what is stored."""
    return sum(step.analysis.repeats for step in rollout.steps)


def _apply(ctx: FlowContext, rollout: e.Rollout, decision: CanaryStep, attempt: CanaryAttempt) -> None:
    """Stores the decision in one transaction (the model server follows what is stored)."""
    step = rollout.current_step
    with ctx.tx() as session, _step_span(session, rollout, decision):
        if decision.action is CanaryAction.REPEAT:
            repo.record_step_attempt(session, rollout.id, step, attempt)
        elif decision.action is CanaryAction.ADVANCE:
            repo.record_step_attempt(session, rollout.id, step, attempt, verdict=e.Verdict.PASS, next_step=step + 1)
        elif decision.action is CanaryAction.ROLLBACK:
            repo.record_step_attempt(session, rollout.id, step, attempt, verdict=e.Verdict.FAIL)
            end_rollout(session, rollout, e.RolloutStatus.ROLLED_BACK, decision.reason)
        elif decision.action is CanaryAction.PROMOTE:
            repo.record_step_attempt(session, rollout.id, step, attempt, verdict=e.Verdict.PASS)
            with span("alias move", rollout_id=rollout.id, actor="canary controller"):
                promote_candidate(session, rollout, actor="canary controller", reason=decision.reason)


def _step_span(session: Session, rollout: e.Rollout, decision: CanaryStep) -> AbstractContextManager[object]:
    """A `rollout step` span in the trace of the run that started the rollout."""
    run = repo.get_run(session, rollout.run_id) if rollout.run_id else None
    return span(
        "rollout step",
        parent=run_traceparent(run.evidence) if run else None,
        rollout_id=rollout.id,
        step=rollout.current_step + 1,
        action=decision.action.value,
        traffic_percent=decision.traffic_percent,
    )


def drive_rollout(
    ctx: FlowContext,
    pipeline: str,
    client: ServingClient,
    *,
    poll_seconds: float | None = None,
    on_decision: StepListener | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
    missing_after_s: float = MISSING_AFTER_S,
) -> RolloutResult | None:
    """Runs the pipeline's active rollout to its end; None if it has none. Resumable at any point.
    A replica silent for `missing_after_s` seconds is missing (`flows/fleet.py`)."""
    poll = poll_seconds if poll_seconds is not None else ctx.settings.canary_poll_seconds
    applied: tuple[int, int] | None = None  # (rollout, step) the server was last told about
    # per rollout: the gate's disagreement (fixed once the run is gated) and the pipeline's task
    judged: dict[int, tuple[float | None, Task]] = {}
    while True:
        with ctx.tx() as session:
            rollout = repo.active_rollout(session, pipeline)
        if rollout is None:
            return _last_result(ctx, pipeline)
        if applied != (rollout.id, rollout.current_step):
            # first: the server loads the canary / applies the weight, then the step's window opens
            # (a new step's window never includes the model load; a resumed step keeps its window)
            applied = _tell_server(client, pipeline, rollout.id, rollout.current_step)
        with ctx.tx() as session:
            try:
                step = repo.begin_rollout_step(session, rollout.id, traffic_percent=rollout.traffic_percent)
            except ConflictError:  # ended or moved on meanwhile: read it again
                continue
            candidate = repo.get_model_version_by_id(session, rollout.candidate_version_id).version
            champion = (
                repo.get_model_version_by_id(session, rollout.champion_version_id).version
                if rollout.champion_version_id
                else None
            )
            if rollout.id not in judged:
                run = repo.get_run(session, rollout.run_id) if rollout.run_id else None
                task = pipeline_task(repo.get_pipeline(session, pipeline))
                judged[rollout.id] = (expected_disagreement(run, champion), task)
        with log_context(pipeline=pipeline, run_id=rollout.run_id):
            progress = RolloutProgress(rollout.current_step, _failures(rollout))
            judge = functools.partial(_decide, progress, rollout.canary_policy, *judged[rollout.id])
            read = _WindowRead(ctx, client, rollout, (candidate, champion), missing_after_s)
            decision, window, server_error, fleet = read.judged(step.started_at, clock(), judge)
            if server_error is not None:
                applied = None  # tell the server again once it answers
            attempt = _attempt(decision, window, server_error, fleet)
            if decision.action is not CanaryAction.WAIT:
                try:
                    _apply(ctx, rollout, decision, attempt)
                except ConflictError as conflict:  # ended meanwhile (manual abort/promote): re-read and stop
                    log.info("rollout %s changed under the controller: %s", rollout.id, conflict)
                    continue
                log.info("rollout %s step %s: %s", rollout.id, rollout.current_step + 1, decision.reason)
                applied = _tell_server(
                    client, pipeline, rollout.id, decision.step_index
                )  # new weight, or no canary, now
            if on_decision is not None:
                on_decision(rollout, decision, attempt)
            if decision.action is CanaryAction.WAIT:
                sleep(poll)


def _decide(
    progress: RolloutProgress, policy: CanarySpec, disagreement: float | None, task: Task, window: CanaryWindow
) -> CanaryStep:
    return next_canary_step(progress, window, policy, expected_disagreement=disagreement, task=task)


@dataclass(frozen=True, slots=True)
class _WindowRead:
    """Reads a step's window: summed over the replicas that report to the metadata database
    (`flows/fleet.py`), or, when none does, the one model server's own window over HTTP."""

    ctx: FlowContext
    client: ServingClient
    rollout: e.Rollout
    versions: tuple[int, int | None]  # candidate, champion
    missing_after_s: float

    def fleet(self, since: datetime, now: datetime) -> FleetWindow | None:
        candidate, champion = self.versions
        heard = heard_since(self.rollout.started_at, self.missing_after_s)
        with self.ctx.tx() as session:
            return read_fleet_window(
                session, self.rollout.pipeline, since=since, now=now, candidate=candidate, champion=champion,
                heard_since=heard, missing_after_s=self.missing_after_s,
            )  # fmt: skip

    def judged(
        self, started_at: datetime, now: datetime, judge: Callable[[CanaryWindow], CanaryStep]
    ) -> tuple[CanaryStep, CanaryWindow, str | None, FleetWindow | None]:
        """The decision on the window since `started_at`, that window, why the server could not be
        read (None: it could), and the fleet's window (None: one server over HTTP)."""
        candidate, champion = self.versions
        elapsed = (now - started_at).total_seconds()
        fleet = self.fleet(started_at, now)
        if fleet is None:
            try:
                stats = self.client.stats(self.rollout.pipeline, elapsed)
                server_error = None
            except InfrastructureError as err:
                log.warning("canary window unreadable: %s", err)
                stats = ModelStats(name=self.rollout.pipeline, champion=None, canary=None, window_seconds=elapsed)
                server_error = err.message
            window = CanaryWindow(stats.window("canary", candidate), stats.window("champion", champion), elapsed)
            return judge(window), window, server_error, None
        window = CanaryWindow(fleet.canary, fleet.champion, elapsed)
        decision = judge(window)
        cut = fleet.complete_since
        if cut is not None and decision.action in (CanaryAction.ADVANCE, CanaryAction.PROMOTE):
            # A replica went silent during this window and its last traffic may be unreported: a
            # pass must rest on a window that every replica still reporting covers, from then on.
            later = self.fleet(cut, now)
            if later is not None:
                fleet, window = later, CanaryWindow(later.canary, later.champion, (now - cut).total_seconds())
                decision = judge(window)
        return decision, window, None, fleet


def _tell_server(client: ServingClient, pipeline: str, rollout_id: int, step_index: int) -> tuple[int, int] | None:
    """Best effort: the server also re-reads SQL on its own every few seconds."""
    try:
        client.load(pipeline)
    except TransientInfraError as err:
        log.warning("could not ask the model server to apply the rollout now: %s", err)
        return None
    return (rollout_id, step_index)


def _last_result(ctx: FlowContext, pipeline: str) -> RolloutResult | None:
    with ctx.tx() as session:
        last = repo.latest_rollout(session, pipeline)
    if last is None:
        return None
    return RolloutResult(last.id, last.status, last.reason or "", last.steps)


_provisioned_lock = threading.Lock()
_provisioned: dict[str, str] = {}  # metadata database URL → this process's own controller key there


def controller_api_key(ctx: FlowContext) -> str:
    """The key the controller sends to the model server: RETRAINER_CONTROLLER_API_KEY, else one this
    process provisions once (`CONTROLLER_KEY_NAME`, scope operate) and shares between its controllers.
    Re-provisioning re-issues the secret, so one controller process per deployment (the rule anyway)."""
    if ctx.settings.controller_api_key is not None:
        return ctx.settings.controller_api_key.get_secret_value()
    database = ctx.settings.database_url
    with _provisioned_lock:
        if database not in _provisioned:
            with ctx.tx() as session:
                _key, _provisioned[database] = repo.provision_api_key(session, CONTROLLER_KEY_NAME, [Scope.OPERATE])
        return _provisioned[database]


@flow(name="canary-rollout", log_prints=False)
def canary_rollout(pipeline: str, serving_url: str | None = None, poll_seconds: float | None = None) -> dict[str, Any]:
    """Prefect flow: drives the pipeline's active rollout to promote or rollback, with a progress
    artifact (steps done / steps) and a markdown artifact of each analysed window."""
    ctx = FlowContext.open()
    client = ServingClient(serving_url or ctx.settings.model_server_url, api_key=controller_api_key(ctx))
    progress: dict[int, Any] = {}

    def report(rollout: e.Rollout, decision: CanaryStep, attempt: CanaryAttempt) -> None:
        steps = len(rollout.canary_policy.steps)
        done = decision.step_index + (1 if decision.action is CanaryAction.PROMOTE else 0)
        percent = 100.0 * done / steps if decision.action is not CanaryAction.ROLLBACK else 100.0
        if rollout.id not in progress:
            progress[rollout.id] = create_progress_artifact(
                percent, key=f"canary-{pipeline}", description=f"{pipeline} rollout {rollout.id}"
            )
        else:
            update_progress_artifact(progress[rollout.id], percent)
        if decision.action is not CanaryAction.WAIT:
            create_markdown_artifact(
                _attempt_markdown(rollout, attempt), key=f"canary-{pipeline}-step", description=decision.reason
            )

    try:
        result = drive_rollout(ctx, pipeline, client, poll_seconds=poll_seconds, on_decision=report)
    finally:
        client.close()
        ctx.close()
    if result is None:
        return {"pipeline": pipeline, "status": None, "reason": "no rollout"}
    return {
        "pipeline": pipeline,
        "rollout_id": result.rollout_id,
        "status": result.status.value,
        "reason": result.reason,
    }


class RolloutSupervisor:
    """A canary controller (`canary_rollout`) for every active rollout, each in a thread of its own;
    one per deployment (`retrainer serve` in-process, `retrainer rollout supervise` on its own).

    A loop service (`flows/loop.py`): each pass rejects the runs whose approval is overdue
    (flows/approvals.py), then is one scan that reaps the controllers that ended, starts one for
    each active rollout that has none (a controller resumes at the stored step, so one that ended
    while its rollout is still active is simply started again), and raises PassIncomplete naming
    every controller that died with an error since the last pass."""

    name = "canary-supervisor"

    def __init__(self, sessions: sessionmaker[Session], serving_url: str | None) -> None:
        self.sessions, self.serving_url = sessions, serving_url
        self.controllers: dict[str, threading.Thread] = {}
        self._died: dict[str, BaseException] = {}
        self._lock = threading.Lock()

    def run_once(self) -> list[str]:
        """One scan; returns the pipelines whose controller it started."""
        for name in [name for name, thread in self.controllers.items() if not thread.is_alive()]:
            del self.controllers[name]
        with self._lock:
            died, self._died = self._died, {}
        expire_overdue_approvals(self.sessions)  # no answer by the deadline rejects (flows/approvals.py)
        with transaction(self.sessions) as session:
            active = [p.name for p in repo.list_pipelines(session) if repo.active_rollout(session, p.name)]
        started = [name for name in active if name not in self.controllers]
        for name in started:
            log.info("canary controller for %s starting", name)
            self.controllers[name] = threading.Thread(
                target=self._control, args=(name,), name=f"canary-{name}", daemon=True
            )
            self.controllers[name].start()
        if died:
            raise PassIncomplete("canary controller(s)", [(f"controller of {name}", err) for name, err in died.items()])
        return started

    def _control(self, pipeline: str) -> None:
        try:
            canary_rollout(pipeline, self.serving_url)
        except Exception as err:  # reported by the next pass (and /healthz), then started again
            log.exception("canary controller for %s died", pipeline)
            with self._lock:
                self._died[pipeline] = err


def _attempt_markdown(rollout: e.Rollout, attempt: CanaryAttempt) -> str:
    rows = markdown_table(attempt)
    canary, champion = attempt.canary, attempt.champion
    return "\n".join(
        [
            f"# {rollout.pipeline} rollout {rollout.id}: {attempt.action.value}",
            attempt.reason,
            f"window {attempt.elapsed_seconds:.1f} s at {attempt.traffic_percent:g} % canary; "
            f"canary v{canary.version}: {canary.requests} requests, {canary.errors} errors; "
            f"champion v{champion.version}: {champion.requests} requests, {champion.errors} errors",
            *rows,
        ]
    )
