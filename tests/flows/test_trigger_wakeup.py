"""The trigger service wakes when events reach the inbox (flows/trigger_service.py `run_forever`,
storage/notify.py): with `debounce_seconds: 0` and a poll interval of 30 s, a run is created and
submitted within a tenth of it (typically ~0.1 s) of the commit that stored its event, in this process (both
backends) and from another client through PostgreSQL's NOTIFY; an insert that notifies nobody is
still picked up by the poll interval (the fallback). Behavioural bounds, not a benchmark
(bench/triggers.py measures the latency)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from flows.loop import LoopHealth
from flows.trigger_service import TriggerService
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from storage.notify import INBOX_CHANNEL, notify
from tests.flows.test_trigger_service import Submitter, _own_postgresql, pipeline, runs, sessions  # noqa: F401
from tests.storage.conftest import wipe

LONG_POLL_S = 30.0
"""The poll interval of the wake-up tests: a run that waited for it would take this long."""
WOKEN_WITHIN_S = 3.0
"""A woken run is submitted within this (typically ~0.1 s; the margin absorbs a busy CI machine's pauses)."""
FALLBACK_POLL_S = 5.0
"""The poll interval of the test that nobody notifies."""


@contextmanager
def started(sessions: sessionmaker[Session], interval_s: float = LONG_POLL_S) -> Iterator[TriggerService]:  # noqa: F811
    """The trigger service in a thread, polling every `interval_s`, once its first passes are over."""
    service, stop, health = TriggerService(sessions, Submitter()), threading.Event(), LoopHealth("triggers")
    options = {"interval_s": interval_s, "health": health}
    thread = threading.Thread(target=service.run_forever, args=(stop,), kwargs=options)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while health.last_ok is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health.last_ok is not None, f"no first pass: {health.last_error}"
        if service.wakeups.listener is not None:
            assert service.wakeups.listener.connected.wait(10)
        time.sleep(0.2)  # the pass the connection woke is over: from now on it waits the full interval
        yield service
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive(), "the trigger service did not stop within 10 s"


def inbox_row(session: Session, dataset: str) -> None:
    """One event stored the way the consumer stores a batch (`add_many_to_inbox`)."""
    data = {"dataset": dataset, "uri": f"s3://d/{dataset}.csv"}
    stored = repo.NewInboxEvent(f"evt-{uuid.uuid4()}", "//tests", "retrainer.data.changed", dataset, {"data": data})
    assert repo.add_many_to_inbox(session, [stored]) == (1, 0)


def seconds_until_submitted(sessions: sessionmaker[Session], name: str, timeout_s: float) -> float:  # noqa: F811
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        found = runs(sessions, name)
        if found and found[0].prefect_flow_run_id is not None:
            assert found[0].trigger_kind is e.TriggerKind.EVENT
            return time.perf_counter() - started
        time.sleep(0.005)
    raise AssertionError(f"no run of {name} submitted within {timeout_s} s")


def test_an_event_stored_in_this_process_starts_its_run_at_once(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    pipeline(sessions, "digits", "digits")
    with started(sessions):
        with transaction(sessions) as session:  # what the consumer does with a batch (consumers/consumer.py)
            inbox_row(session, "digits")
            notify(session, INBOX_CHANNEL)
        assert seconds_until_submitted(sessions, "digits", LONG_POLL_S) < WOKEN_WITHIN_S


def test_an_insert_nobody_notifies_waits_for_the_poll_interval(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    pipeline(sessions, "digits", "digits")
    with started(sessions, FALLBACK_POLL_S):
        with transaction(sessions) as session:
            inbox_row(session, "digits")
        time.sleep(1.0)
        assert runs(sessions, "digits") == []  # no wake-up: nothing before the interval
        assert seconds_until_submitted(sessions, "digits", FALLBACK_POLL_S + 1) < FALLBACK_POLL_S


@pytest.mark.integration
def test_an_event_notified_by_another_process_starts_its_run_at_once(_own_postgresql: str) -> None:  # noqa: F811
    engine = create_db_engine(_own_postgresql)
    wipe(engine)
    own = make_sessions(engine)
    pipeline(own, "digits", "digits")
    other = psycopg.connect(engine.url.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        with started(own):
            with other.transaction():  # another client: nothing in this process hears its commit
                other.execute(
                    "INSERT INTO events (event_id, source, type, dataset, payload, status, received_at) "
                    "VALUES (%s, '//tests', 'retrainer.data.changed', 'digits', '{}', 'received', now())",
                    (f"evt-{uuid.uuid4()}",),
                )
                other.execute("SELECT pg_notify(%s, '')", (INBOX_CHANNEL,))
            assert seconds_until_submitted(own, "digits", LONG_POLL_S) < WOKEN_WITHIN_S
    finally:
        other.close()
        engine.dispose()
