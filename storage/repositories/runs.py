"""Runs: created idempotently per request or debounce window, moved forward, submitted once."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, insert, inspect, literal, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from domain import entities as e
from domain.decisions import run_transition_events
from domain.errors import ConflictError, InvalidInputError, NotFoundError
from storage.orm import SqlEvent, SqlRun, SqlRunEvent, utcnow
from storage.repositories.outbox import record_decision
from storage.repositories.pipelines import find_pipeline_row


def new_run_id() -> str:
    return str(uuid.uuid4())


def find_run_row(session: Session, run_id: str) -> SqlRun:
    row = session.get(SqlRun, run_id)
    if row is None:
        raise NotFoundError(f"run {run_id!r} not found")
    return row


def create_run(
    session: Session,
    pipeline: str,
    trigger_kind: e.TriggerKind,
    *,
    reason: str | None = None,
    idempotency_key: str | None = None,
    request_sha256: str | None = None,
    dedupe_key: str | None = None,
    event_ids: Sequence[str] = (),
    run_id: str | None = None,
    evidence: dict[str, Any] | None = None,
) -> tuple[e.Run, bool]:
    """Creates a queued run, idempotently. Returns (run, created).

    - the same `idempotency_key` with the same `request_sha256` returns the first run;
      with another request it raises ConflictError (code `conflict`; the API answers 422);
    - the same (pipeline, `dedupe_key`) returns the existing run (one run per debounce window).
    A new run is linked to the inbox events `event_ids` (NotFoundError if one is not there).
    """
    row = SqlRun(
        id=run_id,
        pipeline=find_pipeline_row(session, pipeline),
        trigger_kind=trigger_kind.value,
        reason=reason,
        idempotency_key=idempotency_key,
        request_sha256=request_sha256,
        dedupe_key=dedupe_key,
        evidence=evidence,
    )
    return add_run(session, row, lambda: _inbox_rows(session, event_ids))


# SQLAlchemy never caches a dialect INSERT's compiled SQL: neither its Insert nor its ON CONFLICT
# clause states a cache key (`inherit_cache = False`), and compiling the run's INSERT took a third of a
# debouncer pass (2.9 -> 2.0 ms with these, bench/triggers.py). These subclasses state one: the
# statement's is its parent's (table, columns, RETURNING, and the ON CONFLICT clause's key), and the
# clause's is its class alone, true only because `insert_or_skip` gives it no target and no WHERE.


class _PostgresqlInsert(postgresql.Insert):
    inherit_cache = True


class _SqliteInsert(sqlite.Insert):
    inherit_cache = True


class _PostgresqlDoNothing(postgresql.dml.OnConflictDoNothing):
    inherit_cache = True
    _traverse_internals = []


class _SqliteDoNothing(sqlite.dml.OnConflictDoNothing):
    inherit_cache = True
    _traverse_internals = []


def insert_or_skip(dialect: str, values: dict[str, Any]) -> Any:
    """INSERT … ON CONFLICT DO NOTHING (any unique constraint) RETURNING the run, for `dialect`'s
    engine: storage/db.py makes engines for PostgreSQL and SQLite only (RETURNING: SQLite 3.35+)."""
    postgres = dialect == "postgresql"
    statement = (_PostgresqlInsert if postgres else _SqliteInsert)(SqlRun).values(values).returning(SqlRun)
    # what on_conflict_do_nothing() sets, with the clause that states its cache key
    statement._post_values_clause = _PostgresqlDoNothing() if postgres else _SqliteDoNothing()
    return statement


def add_run(
    session: Session, row: SqlRun, events: Callable[[], Sequence[SqlEvent]] | Sequence[SqlEvent] = ()
) -> tuple[e.Run, bool]:
    """`create_run` of a new row its caller built, with its `pipeline` row set, linked to inbox rows
    the caller holds (`events`, or a callable returning them, called only when the run is new): the
    debouncer, which has locked both, writes its runs with no query reading them again. The row gets
    its id (unless set), status queued and created_at here; the run returned is another row object.

    The database decides: one INSERT … ON CONFLICT DO NOTHING RETURNING, where a SELECT, a savepoint,
    the INSERT and its release used to be. Nothing returned means a run holds the Idempotency-Key or
    the (pipeline, dedupe key) already (an earlier request, or a concurrent one that committed
    first: PostgreSQL waits for it), and that run is read."""
    pipeline = row.pipeline
    row.id = row.id or new_run_id()
    values = {column.key: getattr(row, column.key) for column in inspect(SqlRun).column_attrs}
    values.update(pipeline_id=pipeline.id, status=e.RunStatus.QUEUED.value, created_at=utcnow())
    new = session.scalars(insert_or_skip(session.get_bind().dialect.name, values)).one_or_none()
    if new is None:
        existing = _existing_run(session, pipeline.id, row.idempotency_key, row.request_sha256, row.dedupe_key)
        if existing is None:
            raise ConflictError(f"run id {row.id!r} is taken; create the run without an id to get a new one")
        return existing.to_entity(), False
    # the links go in one statement; the relationships are set from the rows at hand, so the entity
    # is built with nothing read back
    linked = sorted(events() if callable(events) else events, key=lambda event: event.id)
    if linked:
        session.execute(insert(SqlRunEvent), [{"run_id": new.id, "event_pk": event.id} for event in linked])
    set_committed_value(new, "pipeline", pipeline)
    set_committed_value(new, "events", linked)
    for event_row in linked:
        event_row.status = e.EventStatus.LINKED.value
    session.flush()
    created = new.to_entity()
    _record_transition(session, None, created)
    return created, True


def _existing_run(
    session: Session,
    pipeline_id: int,
    idempotency_key: str | None,
    request_sha256: str | None,
    dedupe_key: str | None,
) -> SqlRun | None:
    if idempotency_key is not None:
        row = session.scalars(select(SqlRun).where(SqlRun.idempotency_key == idempotency_key)).one_or_none()
        if row is not None:
            if row.request_sha256 != request_sha256 or row.pipeline_id != pipeline_id:
                raise ConflictError(
                    f"Idempotency-Key {idempotency_key!r} was already used for a different request "
                    f"(run {row.id}); use a new key for a new request"
                )
            return row
    if dedupe_key is not None:
        query = select(SqlRun).where(SqlRun.pipeline_id == pipeline_id, SqlRun.dedupe_key == dedupe_key)
        return session.scalars(query).one_or_none()
    return None


def link_events(session: Session, run_id: str, event_ids: Sequence[str]) -> None:
    """Attaches inbox events to a run (idempotent) and marks them linked."""
    rows = _inbox_rows(session, event_ids)
    already = set(session.scalars(select(SqlRunEvent.event_pk).where(SqlRunEvent.run_id == run_id)))
    for row in rows:
        if row.id not in already:
            session.add(SqlRunEvent(run_id=run_id, event_pk=row.id))
        row.status = e.EventStatus.LINKED.value
    session.flush()


def _inbox_rows(session: Session, event_ids: Sequence[str]) -> Sequence[SqlEvent]:
    if not event_ids:
        return ()
    rows = session.scalars(select(SqlEvent).where(SqlEvent.event_id.in_(list(event_ids)))).all()
    missing = set(event_ids) - {row.event_id for row in rows}
    if missing:
        raise NotFoundError(f"events not in the inbox: {', '.join(sorted(missing))}")
    return rows


def run_events(session: Session, run_id: str) -> list[e.InboxEvent]:
    """The inbox events a run was created for, in the order they were received."""
    return [row.to_entity() for row in find_run_row(session, run_id).events]


def get_run(session: Session, run_id: str) -> e.Run:
    return find_run_row(session, run_id).to_entity()


def lock_run(session: Session, run_id: str) -> e.Run:
    """The run as stored now, its row locked until the caller's transaction ends (SELECT … FOR
    UPDATE; SQLite has one writer at a time anyway), so of two callers deciding one run at once the
    second sees the first's decision."""
    # OF runs: PostgreSQL refuses to lock the nullable side of the outer joins SqlRun loads eagerly
    query = select(SqlRun).where(SqlRun.id == run_id).with_for_update(of=SqlRun)
    query = query.execution_options(populate_existing=True)
    row = session.scalars(query).one_or_none()
    if row is None:
        raise NotFoundError(f"run {run_id!r} not found")
    return row.to_entity()


def runs_with_status(session: Session, status: e.RunStatus, pipeline: str | None = None) -> list[e.Run]:
    """Every run with `status` (only `pipeline`'s if given), oldest first (the runs.status index)."""
    query = select(SqlRun).where(SqlRun.status == status.value).order_by(SqlRun.created_at, SqlRun.id)
    if pipeline is not None:
        query = query.where(SqlRun.pipeline_id == find_pipeline_row(session, pipeline).id)
    return [row.to_entity() for row in session.scalars(query)]


@dataclass(frozen=True, slots=True)
class RunPosition:
    """A place in the run lists' order (newest first: created_at, then id): where a page ended."""

    created_at: datetime
    run_id: str


def list_runs(
    session: Session, pipeline: str | None = None, limit: int = 50, *, after: RunPosition | None = None
) -> list[e.Run]:
    """Runs newest first (only `pipeline`'s if given), starting after `after` when given."""
    return runs_page(session, pipeline, limit, after=after)[0]


def runs_page(
    session: Session, pipeline: str | None = None, limit: int = 50, *, after: RunPosition | None = None
) -> tuple[list[e.Run], RunPosition | None]:
    """A page of `list_runs` and where the next page starts (None: this is the last one). Keyset
    paging over the (pipeline_id,) created_at, id indexes: a deep page costs what the first does."""
    if not 1 <= limit <= 1000:
        raise InvalidInputError(f"limit must be between 1 and 1000 (got {limit})")
    query = (
        select(SqlRun)
        .options(selectinload(SqlRun.events))  # one query for every run's events, not one per run
        .order_by(SqlRun.created_at.desc(), SqlRun.id.desc())
        .limit(limit + 1)
    )
    if pipeline is not None:
        query = query.where(SqlRun.pipeline_id == find_pipeline_row(session, pipeline).id)
    if after is not None:
        # A row-value comparison, so PostgreSQL starts the index scan at the position.
        position = tuple_(literal(after.created_at, SqlRun.created_at.type), literal(after.run_id, SqlRun.id.type))
        query = query.where(tuple_(SqlRun.created_at, SqlRun.id) < position)
    rows = session.scalars(query).all()
    runs = [row.to_entity() for row in rows[:limit]]
    more = len(rows) > limit
    return runs, RunPosition(runs[-1].created_at, runs[-1].id) if more else None


def update_run(
    session: Session,
    run_id: str,
    *,
    status: e.RunStatus | None = None,
    error: str | None = None,
    prefect_flow_run_id: str | None = None,
    dataset_version_id: int | None = None,
    model_version_id: int | None = None,
    evidence: dict[str, Any] | None = None,
) -> e.Run:
    """Moves a run forward. A final status is never left again (ConflictError). A new status writes
    its decision events (run started or finished, approval requested or decided) in the same transaction."""
    row = find_run_row(session, run_id)
    before = e.RunStatus(row.status)
    if status is not None and status.value != row.status:
        current = e.RunStatus(row.status)
        if current.is_final:
            raise ConflictError(f"run {run_id} is already {current.value}; it cannot become {status.value}")
        row.status = status.value
        now = utcnow()
        if status is e.RunStatus.RUNNING and row.started_at is None:
            row.started_at = now
        if status.is_final:
            row.finished_at = now
    if error is not None:
        row.error = error
    if prefect_flow_run_id is not None:
        row.prefect_flow_run_id = prefect_flow_run_id
    if dataset_version_id is not None:
        row.dataset_version_id = dataset_version_id
    if model_version_id is not None:
        row.model_version_id = model_version_id
    if evidence is not None:
        row.evidence = {**(row.evidence or {}), **evidence}
    session.flush()
    run = row.to_entity()
    _record_transition(session, before, run)
    return run


def _record_transition(session: Session, before: e.RunStatus | None, run: e.Run) -> None:
    for event in run_transition_events(before, run):
        record_decision(session, event)


# Stands in the flow-run id while a submission is in flight; `submission_claimed_at` says since when.
SUBMITTING = "submitting"
# A claim older than this belongs to a process that died between claiming and recording the flow
# run: the run may be claimed again. Submitting twice is harmless (Prefect's idempotency key is
# the run id), so the timeout only needs to exceed one submission's time, not be exact.
SUBMISSION_CLAIM_TIMEOUT = timedelta(minutes=5)


def _claimable(now: datetime) -> ColumnElement[bool]:
    """Queued, and no flow run yet: never claimed, or claimed before the timeout (or before 0004)."""
    expired = and_(
        SqlRun.prefect_flow_run_id == SUBMITTING,
        or_(SqlRun.submission_claimed_at.is_(None), SqlRun.submission_claimed_at < now - SUBMISSION_CLAIM_TIMEOUT),
    )
    return and_(SqlRun.status == e.RunStatus.QUEUED.value, or_(SqlRun.prefect_flow_run_id.is_(None), expired))


def claim_submission(session: Session, run_id: str, now: datetime | None = None) -> bool:
    """Compare-and-set: only one caller gets to submit a queued run's flow run (the others see
    it claimed, until the claim expires). Released with `release_submission` if the submission fails."""
    now = now or utcnow()
    result = session.execute(
        update(SqlRun)
        .where(SqlRun.id == run_id, _claimable(now))
        .values(prefect_flow_run_id=SUBMITTING, submission_claimed_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def unsubmitted_runs(session: Session, limit: int = 100, now: datetime | None = None) -> list[e.Run]:
    """Queued runs with no flow run, oldest first: new ones, those whose submission failed (e.g.
    Prefect was down) and those whose claim expired (`SUBMISSION_CLAIM_TIMEOUT`). Never a schedule
    run: its own flow run creates it, then records itself on it (submitting it would start a second)."""
    query = (
        select(SqlRun)
        .where(_claimable(now or utcnow()), SqlRun.trigger_kind != e.TriggerKind.SCHEDULE.value)
        .order_by(SqlRun.created_at)
        .limit(limit)
    )
    return [row.to_entity() for row in session.scalars(query)]


def record_submission(session: Session, run_id: str, flow_run_id: str) -> bool:
    """Records the submitted flow run on its run while the submission's claim holds (or that flow run
    already recorded itself, having started first). False when another flow run took the run meanwhile
    (a late start of the one this submission replaced): it keeps it, and the new one, finding the run
    taken, ends cancelled without touching it (flows/pipeline.py)."""
    result = session.execute(
        update(SqlRun)
        .where(SqlRun.id == run_id, SqlRun.prefect_flow_run_id.in_((SUBMITTING, flow_run_id)))
        .values(prefect_flow_run_id=flow_run_id)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release_submission(session: Session, run_id: str) -> None:
    session.execute(
        update(SqlRun)
        .where(SqlRun.id == run_id, SqlRun.prefect_flow_run_id == SUBMITTING)
        .values(prefect_flow_run_id=None, submission_claimed_at=None)
        .execution_options(synchronize_session=False)
    )
