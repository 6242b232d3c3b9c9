"""The debouncer's query budget: a window's runs are written from the rows its transaction locked
and read, so no query reads the pipeline, the events or the new run again (flows/triggers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.decisions import DecisionType
from flows import tracing
from flows.triggers import process_pending_events, submit_unsubmitted_runs
from storage import repositories as repo
from storage.db import transaction
from tests.flows import test_trigger_service as service

# The fixtures of the trigger service's tests: a database of this module's own on PostgreSQL, and SQLite.
_own_postgresql = service._own_postgresql
sessions = service.sessions

# Per pass: lock the window's events, read the dataset's pipelines, and once mark the events linked
# (the first run's flush: then they are). Per created run: is one in progress, insert the run (ON
# CONFLICT DO NOTHING: no SELECT of the window's run, no savepoint), insert its links (one
# statement), record run.created.
PER_PASS = 3
PER_RUN = 4
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@contextmanager
def counted(sessions: sessionmaker[Session]) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    engine = sessions.kw["bind"]
    sa_event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa_event.remove(engine, "before_cursor_execute", record)


def test_a_window_costs_a_fixed_number_of_queries_per_created_run(sessions: sessionmaker[Session]) -> None:
    names = [f"pipe-{i}" for i in range(3)]
    for name in names:
        service.pipeline(sessions, name, "orders")
    event_ids = [service.event(sessions, "orders") for _ in range(4)]
    with transaction(sessions) as session:  # the first event carries the producer's trace
        repo.add_to_inbox(
            session,
            event_id="evt-traced",
            source="//tests",
            type="retrainer.data.changed",
            dataset="orders",
            payload={"traceparent": TRACEPARENT},
        )
    event_ids.append("evt-traced")

    with counted(sessions) as statements:
        results = process_pending_events(sessions, datasets=["orders"])

    assert [r.created for r in results] == [True] * 3
    assert len(statements) <= PER_PASS + PER_RUN * len(results), "\n".join(statements)
    # what the saved queries used to read back is still what the runs are
    for name in names:
        [run] = service.runs(sessions, name)
        assert run.status is e.RunStatus.QUEUED
        assert sorted(run.event_ids) == sorted(event_ids)
        assert tracing.run_traceparent(run.evidence) is not None
    with transaction(sessions) as session:
        assert repo.pending_events(session, "orders") == []
        assert {repo.get_event(session, i).status for i in event_ids} == {e.EventStatus.LINKED}
        created = [ev for ev in repo.outbox_events(session) if ev.type is DecisionType.RUN_CREATED]
    assert sorted(ev.pipeline for ev in created) == names


def test_a_second_pass_over_the_same_window_reads_and_writes_nothing_more(sessions: sessionmaker[Session]) -> None:
    service.pipeline(sessions, "pipe", "orders")
    service.event(sessions, "orders")
    [first] = process_pending_events(sessions, datasets=["orders"])

    with counted(sessions) as statements:
        assert process_pending_events(sessions, datasets=["orders"]) == []

    assert len(statements) == 1  # the lock query finds nothing pending
    assert first.created


def test_a_run_handed_over_is_submitted_before_any_query_for_queued_runs(sessions: sessionmaker[Session]) -> None:
    """The creation loop hands its new runs to the submission loop: the claim is the only statement
    before Prefect is called, and the query for older queued runs comes after (and skips it)."""
    service.pipeline(sessions, "pipe", "orders")
    service.event(sessions, "orders")
    [created] = process_pending_events(sessions, datasets=["orders"])
    before_call: list[list[str]] = []

    with counted(sessions) as statements:

        def submit(run: e.Run) -> str:
            before_call.append(list(statements))
            return f"flow-run-of-{run.id}"

        assert submit_unsubmitted_runs(sessions, submit, [created.run]) == [created.run.id]

    [claim] = before_call[0]
    assert claim.lstrip().upper().startswith("UPDATE RUNS")
    assert len(before_call) == 1  # the query after the call found it submitted: not submitted again
    [run] = service.runs(sessions, "pipe")
    assert run.prefect_flow_run_id == f"flow-run-of-{run.id}"


def test_a_schedule_run_handed_over_is_not_submitted(sessions: sessionmaker[Session]) -> None:
    """A schedule run's own flow run made it: submitting it would start a second one."""
    service.pipeline(sessions, "pipe", "orders")
    with transaction(sessions) as session:
        scheduled, _ = repo.create_run(session, "pipe", e.TriggerKind.SCHEDULE, dedupe_key="cron:1")
    calls: list[str] = []

    def submit(run: e.Run) -> str:
        calls.append(run.id)
        return f"flow-run-of-{run.id}"

    assert submit_unsubmitted_runs(sessions, submit, [scheduled]) == [] and calls == []
