"""Every trigger becomes a Run row the same way: `TriggerRequest` → `repo.create_run` (the debouncer
calls its core, `repo.add_run`, with the rows it has locked), written idempotently (the database
decides: a unique Idempotency-Key, a unique (pipeline, dedupe key) per debounce window or schedule
slot). `request_run(sessions, pipeline, request, submit)` is the door of
single requests (the API): it also submits the flow run at once. Submission is claimed in the
database, so one caller submits a run, with the run id as Prefect's idempotency key, so a retry
can never start a second flow run (a run submitted again after its flow run crashed,
flows/reconcile.py, uses `{run_id}:{attempt}`).

`process_pending_events` is the debouncer: per dataset it waits for a quiet period of
`debounce_seconds` after the newest pending event, bounded by `max_wait_seconds` after the
oldest, then creates one run per pipeline of that dataset for the whole window, linked to every
event in it. `while_running` decides what happens when that pipeline already has a run in progress:
`queue` waits for it to finish and then starts one follow-up with everything that arrived,
`skip` marks the window's events ignored, `supersede` starts the new run at once. It only creates
runs: `submit_unsubmitted_runs`, in the same pass of the trigger service, submits them, so a
Prefect outage can never stop the runs of a dataset's other pipelines from being created.

Both go through every dataset or run they have, and end with `PassIncomplete` naming those that
failed. A submission that Prefect refuses for good (the pipeline's deployment does not exist)
fails its run with the reason and the fix; any other submission error leaves the run queued for
the next pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prometheus_client import Counter, Histogram
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import ConfigurationError, TransientInfraError
from domain.trigger_spec import EventTriggerSpec
from flows import tracing
from flows.loop import PassIncomplete, describe
from storage import repositories as repo
from storage.db import transaction
from storage.orm import SqlEvent, SqlPipeline, SqlRun

log = logging.getLogger("retrainer.flows.triggers")

RunSubmitter = Callable[[e.Run], str | None]
"""Starts the flow run for a new Run row; returns the Prefect flow-run id (None if not submitted).
Raises DeploymentNotFoundError when the run can never be submitted; any other error is passing."""


class DeploymentNotFoundError(ConfigurationError, code="deployment_not_found"):
    """Prefect has no deployment for the pipeline: its runs cannot be submitted until one is made."""


IN_PROGRESS = (e.RunStatus.QUEUED.value, e.RunStatus.RUNNING.value)

# Low-cardinality by design: no event ids, no run ids.
RUNS_CREATED = Counter("retrainer_runs_created_total", "Runs created, by trigger kind", ["trigger"])
TRIGGER_LATENCY = Histogram(
    "retrainer_trigger_latency_seconds",
    "From an event's arrival in the inbox to its run's creation",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


@dataclass(frozen=True, slots=True)
class TriggerRequest:
    kind: e.TriggerKind
    reason: str | None = None
    idempotency_key: str | None = None
    request_sha256: str | None = None
    dedupe_key: str | None = None
    event_ids: tuple[str, ...] = ()

    def row_fields(self) -> dict[str, Any]:
        """What the Run row records of the request, besides its kind (`repo.create_run`'s keywords)."""
        return {name: getattr(self, name) for name in _ROW_FIELDS}


_ROW_FIELDS = ("reason", "idempotency_key", "request_sha256", "dedupe_key", "event_ids")


@dataclass(frozen=True, slots=True)
class TriggerResult:
    run: e.Run
    created: bool


def request_run(
    sessions: sessionmaker[Session], pipeline: str, request: TriggerRequest, submit: RunSubmitter | None
) -> TriggerResult:
    with transaction(sessions) as session:
        run, created = _create_run(session, pipeline, request)
    if created:
        RUNS_CREATED.labels(request.kind.value).inc()
    # A run whose submission failed earlier (Prefect down) is submitted by the next identical
    # request. The database hands the submission to exactly one caller (claim_submission), and
    # Prefect's idempotency key (the run id) would turn a second one into the same flow run anyway.
    if submit is not None and run.prefect_flow_run_id is None and run.status is e.RunStatus.QUEUED:
        try:
            run = _submit_claimed(sessions, run, submit) or run
        except DeploymentNotFoundError:
            raise  # the run is failed, naming the fix: the caller must hear it
        except Exception as error:
            # Prefect did not answer: the run stays queued and the trigger service submits it
            # once Prefect is back. The request itself succeeded.
            log.warning("run %s queued, submission deferred to the trigger service: %s", run.id, error)
    return TriggerResult(run, created)


def _submit_claimed(sessions: sessionmaker[Session], run: e.Run, submit: RunSubmitter) -> e.Run | None:
    """Claims the run's submission, submits it and records the flow run id: the run as updated, or
    None when another caller holds the claim or the submitter returned no id (claim released). A
    submitter that raises releases the claim too, so a later pass retries; one that finds no
    deployment fails the run, naming the deployment and the fix, and raises."""
    parent = tracing.run_traceparent(run.evidence)
    with tracing.span("submit", parent=parent, pipeline=run.pipeline, run_id=run.id):
        return _submit_traced(sessions, run, submit)


def _submit_traced(sessions: sessionmaker[Session], run: e.Run, submit: RunSubmitter) -> e.Run | None:
    with transaction(sessions) as session:
        if not repo.claim_submission(session, run.id):
            return None
        # the flow run reads this before it starts: its spans are the submission's children
        if traceparent := tracing.current_traceparent():
            repo.update_run(session, run.id, evidence={"traceparent": traceparent})
    try:
        flow_run_id = submit(run)
    except DeploymentNotFoundError as missing:
        with transaction(sessions) as session:
            repo.release_submission(session, run.id)
            repo.update_run(session, run.id, status=e.RunStatus.FAILED, error=missing.message)
        raise
    except BaseException:
        with transaction(sessions) as session:
            repo.release_submission(session, run.id)
        raise
    with transaction(sessions) as session:
        if flow_run_id:
            if not repo.record_submission(session, run.id, flow_run_id):
                log.warning("run %s: another flow run took it while flow run %s was submitted", run.id, flow_run_id)
            return repo.get_run(session, run.id)
        repo.release_submission(session, run.id)
        return None


def attempts_of(run: e.Run) -> int:
    """How many times the run was submitted again after its flow run crashed (flows/reconcile.py)."""
    return len((run.evidence or {}).get("resubmits", []))


def submission_key(run: e.Run) -> str:
    """Prefect's idempotency key of the run's flow run: the run id, then `{run_id}:{attempt}` for
    each resubmission, so a resubmission is a new flow run and a retried one is the same one."""
    attempts = attempts_of(run)
    return f"{run.id}:{attempts}" if attempts else run.id


# Prefect's server answers 503 while its SQLite database is busy (two of its own writers: SQLITE_BUSY_SNAPSHOT
# fails at once whatever the busy timeout) without Retry-After, and its client then sleeps 2**attempt s, even
# after its last try: one busy answer was a 2 s stall, the whole tail of produce → flow run submitted under
# `retrainer serve`. The idempotency key makes a retry safe, so the submitter's client turns a busy answer
# into PrefectBusyError (an httpx response hook, before Prefect's retry loop sees it) and retries it itself
# after each of these delays; then the run stays queued for the next pass.
BUSY_RETRY_DELAYS_S = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
_BUSY_STATUSES = frozenset({408, 429, 502, 503})  # the statuses Prefect's client sleeps after (and extra codes)


class PrefectBusyError(TransientInfraError):
    """Prefect's API answered busy (408, 429, 502, 503 or one of PREFECT_CLIENT_RETRY_EXTRA_CODES)."""


def _raise_if_busy(response: Any) -> None:
    from prefect.settings import PREFECT_CLIENT_RETRY_EXTRA_CODES

    if response.status_code in _BUSY_STATUSES or response.status_code in PREFECT_CLIENT_RETRY_EXTRA_CODES.value():
        raise PrefectBusyError(f"Prefect's API answered {response.status_code} to {response.request.url.path}")


def prefect_submitter(flow_name: str = "retrainer-pipeline") -> RunSubmitter:
    """Submits to the pipeline's deployment (`retrainer-pipeline/<pipeline>`) with
    `submission_key(run)` as Prefect's idempotency key, so submitting the same run twice creates one
    flow run.

    One call per submission: the flow run is created on a Prefect client kept open between calls
    (its connections stay alive) from the deployment id resolved once per pipeline, where
    `run_deployment` opens a client and looks the deployment up by name every time. A cached id
    that Prefect no longer knows (the deployment was deleted or re-created) is resolved again once;
    a client that failed is replaced at the next call."""
    import httpx
    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.context import SettingsContext, get_settings_context
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

    lock = threading.Lock()
    deployment_ids: dict[str, UUID] = {}
    open_client: list[SyncPrefectClient] = []  # at most one, opened by the first submission
    # The settings the client was opened under, with Prefect's retries off (built once: a copy takes ~20 ms).
    # Its client retries a refused connection with back-off (about a minute) once it has connected, which a
    # kept-open client always has: a Prefect outage would hold every submission, and the API request making
    # it, that long. Refused fails fast; busy answers and dropped requests are retried by `create`.
    no_retries: list[SettingsContext] = []

    def client() -> SyncPrefectClient:
        with lock:
            if not open_client:
                current = get_settings_context()
                settings = current.settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})
                no_retries[:] = [SettingsContext(profile=current.profile, settings=settings)]
                hooks = {"event_hooks": {"response": [_raise_if_busy]}}
                open_client.append(get_client(sync_client=True, httpx_settings=hooks).__enter__())
            return open_client[0]

    def forget_client(failed: SyncPrefectClient) -> None:
        with lock:
            if failed in open_client:
                open_client.remove(failed)
                failed.__exit__(None, None, None)

    def deployment_id(prefect: SyncPrefectClient, name: str, run: e.Run) -> UUID:
        if (known := deployment_ids.get(name)) is not None:
            return known
        try:
            deployment_ids[name] = prefect.read_deployment_by_name(name).id
        except ObjectNotFound as err:
            raise DeploymentNotFoundError(
                f"Prefect has no deployment {name!r}, so run {run.id} cannot start; create it with "
                "`retrainer pipelines deploy` (work pools) or start the runner (`retrainer serve`, "
                "`python -m retrainer.runner`), then trigger the pipeline again"
            ) from err
        return deployment_ids[name]

    def create_once(prefect: SyncPrefectClient, name: str, run: e.Run) -> str:
        with SettingsContext(profile=no_retries[0].profile, settings=no_retries[0].settings):
            flow_run = prefect.create_flow_run_from_deployment(
                deployment_id(prefect, name, run),
                parameters={"pipeline": run.pipeline, "run_id": run.id},
                idempotency_key=submission_key(run),
                tags=[f"pipeline:{run.pipeline}", f"trigger:{run.trigger_kind.value}"],
            )
        return str(flow_run.id)

    def create(prefect: SyncPrefectClient, name: str, run: e.Run) -> str:
        """`create_once`, again after each of BUSY_RETRY_DELAYS_S while Prefect is busy."""
        for delay in (*BUSY_RETRY_DELAYS_S, None):
            try:
                return create_once(prefect, name, run)
            except PrefectBusyError:
                if delay is None:
                    raise
            except httpx.TransportError as err:  # a refused connection fails fast: the run stays queued
                if isinstance(err, httpx.ConnectError) or delay is None:
                    raise
            time.sleep(delay)
        raise AssertionError("unreachable: the last delay is None")

    def submit(run: e.Run) -> str | None:
        name = f"{flow_name}/{run.pipeline}"
        prefect = client()
        try:
            try:
                return create(prefect, name, run)
            except httpx.HTTPStatusError as err:
                if err.response.status_code != 404 or deployment_ids.pop(name, None) is None:
                    raise
                return create(prefect, name, run)  # the cached id is gone: look the name up again
        except (DeploymentNotFoundError, PrefectBusyError):  # the client is fine: keep it for the others
            raise
        except Exception:
            forget_client(prefect)
            raise

    return submit


def submit_unsubmitted_runs(
    sessions: sessionmaker[Session], submit: RunSubmitter, first: Sequence[e.Run] = ()
) -> list[str]:
    """Submits the queued runs that have no flow run yet (new ones, and those whose submission
    failed), oldest first; each is claimed first, so two trigger services never submit one run
    twice. `first`: runs the caller has just created (the trigger service's creation loop hands them
    over), submitted before the query for the others, so a new run waits for no query. Returns the
    ids submitted; raises PassIncomplete after trying all if any stays queued."""
    submitted: list[str] = []
    failures: list[tuple[str, BaseException]] = []
    # as `unsubmitted_runs`: a schedule run's own flow run made it (submitting it would start a second)
    first = [run for run in first if run.trigger_kind is not e.TriggerKind.SCHEDULE]
    _submit_each(sessions, submit, first, submitted, failures)
    tried = {run.id for run in first}
    with transaction(sessions) as session:
        waiting = [run for run in repo.unsubmitted_runs(session) if run.id not in tried]
    _submit_each(sessions, submit, waiting, submitted, failures)
    if failures:
        raise PassIncomplete(f"of {len(first) + len(waiting)} run submissions", failures)
    return submitted


def _submit_each(
    sessions: sessionmaker[Session],
    submit: RunSubmitter,
    runs: Sequence[e.Run],
    submitted: list[str],
    failures: list[tuple[str, BaseException]],
) -> None:
    for run in runs:
        try:
            if (updated := _submit_claimed(sessions, run, submit)) is not None:
                submitted.append(run.id)
                log.info("run %s of %s submitted: flow run %s", run.id, run.pipeline, updated.prefect_flow_run_id)
        except DeploymentNotFoundError as missing:
            log.error("run %s of %s failed: %s", run.id, run.pipeline, missing.message)
        except Exception as error:
            log.warning("run %s of %s stays queued: submission failed: %s", run.id, run.pipeline, describe(error))
            failures.append((f"run {run.id} ({run.pipeline})", error))


def process_pending_events(
    sessions: sessionmaker[Session],
    now: datetime | None = None,
    datasets: Sequence[str] | None = None,
) -> list[TriggerResult]:
    """One pass of the debouncer over every dataset with pending events (or only `datasets`); it
    creates runs and never submits them. A dataset that fails is logged and left pending; the
    others are done, then PassIncomplete names the failed ones."""
    now = now or datetime.now(UTC)
    if datasets is None:
        with transaction(sessions) as session:
            pending = select(SqlEvent.dataset).where(SqlEvent.status == e.EventStatus.RECEIVED.value).distinct()
            datasets = sorted(set(session.scalars(pending)))
    results: list[TriggerResult] = []
    failures: list[tuple[str, BaseException]] = []
    for dataset in datasets:
        try:
            results += _process_dataset(sessions, dataset, now)
        except Exception as error:
            log.warning("events of dataset %s stay pending: %s", dataset, describe(error))
            failures.append((f"dataset {dataset}", error))
    if failures:
        raise PassIncomplete(f"of {len(datasets)} datasets", failures)
    return results


def _create_run(session: Session, pipeline: str, request: TriggerRequest) -> tuple[e.Run, bool]:
    """`repo.create_run`; a new run records the current span's traceparent, where its submission continues."""
    return repo.create_run(session, pipeline, request.kind, **request.row_fields(), evidence=_trace_evidence())


def _trace_evidence() -> dict[str, Any] | None:
    """A new run's first evidence: the current span's traceparent, written with the row (no update)."""
    traceparent = tracing.current_traceparent()
    return {"traceparent": traceparent} if traceparent else None


def _process_dataset(sessions: sessionmaker[Session], dataset: str, now: datetime) -> list[TriggerResult]:
    """Creates the window's runs of every pipeline in the transaction that locks its events: all of
    them or none (linking marks the events, so a run created alone would strand the others)."""
    requests: list[tuple[SqlPipeline, str]] = []
    results: list[TriggerResult] = []
    with transaction(sessions) as session:
        # Lock this dataset's pending events: a second trigger process skips them (PostgreSQL).
        rows = session.scalars(
            select(SqlEvent)
            .where(SqlEvent.dataset == dataset, SqlEvent.status == e.EventStatus.RECEIVED.value)
            .order_by(SqlEvent.id)
            .with_for_update(skip_locked=True)
        ).all()
        if not rows:
            return []
        pipelines = session.scalars(select(SqlPipeline).where(SqlPipeline.dataset == dataset)).all()
        if not pipelines:
            return []  # no pipeline listens to this dataset (yet): keep the events pending
        first, last = rows[0], rows[-1]
        event_ids = tuple(row.event_id for row in rows)
        traceparents = [tracing.run_traceparent(row.payload) for row in rows]
        waiting = False
        for pipeline in pipelines:
            policy = EventTriggerSpec.model_validate(pipeline.spec.get("triggers", {}).get("events", {}))
            quiet = now - last.received_at >= timedelta(seconds=policy.debounce_seconds)
            overdue = now - first.received_at >= timedelta(seconds=policy.max_wait_seconds)
            if not (quiet or overdue):
                waiting = True
                continue
            busy = session.scalars(
                select(SqlRun.id).where(SqlRun.pipeline_id == pipeline.id, SqlRun.status.in_(IN_PROGRESS)).limit(1)
            ).first()
            if busy is not None and policy.while_running == "queue":
                waiting = True
                continue
            if busy is not None and policy.while_running == "skip":
                log.info("skipping %d events for %s: run %s is in progress", len(rows), pipeline.name, busy)
                continue
            reason = f"{len(rows)} data-change event(s) for {dataset}" + (f"; superseding run {busy}" if busy else "")
            requests.append((pipeline, reason))
        if not waiting and not requests:  # every pipeline skipped the window
            repo.set_event_status(session, event_ids, e.EventStatus.IGNORED)
        if requests:  # the runs continue the trace of the window's first traced event, linked to the others'
            parent = next((tp for tp in traceparents if tp), None)
            with tracing.span("debounce", parent=parent, links=traceparents, dataset=dataset, events=len(rows)):
                # From the rows this transaction locked and read: no query reads the pipeline or
                # the events again, nor the run once written (tests/flows/test_trigger_queries.py).
                evidence = _trace_evidence()
                window, kind = f"events:{first.event_id}", e.TriggerKind.EVENT.value
                for pipeline, reason in requests:
                    row = SqlRun(
                        pipeline=pipeline, trigger_kind=kind, reason=reason, dedupe_key=window, evidence=evidence
                    )
                    results.append(TriggerResult(*repo.add_run(session, row, rows)))
        received_at = first.received_at
    for result in results:
        if result.created:
            RUNS_CREATED.labels(e.TriggerKind.EVENT.value).inc()
            TRIGGER_LATENCY.observe(max(0.0, (datetime.now(UTC) - received_at).total_seconds()))
            log.info("run %s for %s from %d events", result.run.id, result.run.pipeline, len(event_ids))
    return results
