"""Wake-ups (storage/notify.py): a commit wakes its channel's waiters in this process on both
backends, a NOTIFY from another connection wakes a PostgreSQL listener within 100 ms (and still
does after PostgreSQL drops the listener's connection), a rollback wakes nobody, SQLite waiters
fall back to their interval, and the repositories that move a champion or a rollout's weight
notify the serving channel with the pipeline's name, in the same transaction."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from storage import repositories as repo
from storage.db import make_sessions, transaction
from storage.notify import SERVING_CHANNEL, Wakeups, notify, subscribe
from tests.storage.repositories.conftest import SHA_A, SHA_B, tx

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def conninfo(engine: Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def send_notify(engine: Engine, channel: str, payload: str = "") -> None:
    """A NOTIFY from a plain psycopg connection: another client, not this process's sessions."""
    with psycopg.connect(conninfo(engine), autocommit=True) as other:
        other.execute("SELECT pg_notify(%s, %s)", (channel, payload))


@pytest.fixture
def channel() -> str:
    return f"retrainer_test_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def pg_engine(_postgresql_engine: Engine) -> Engine:
    return _postgresql_engine


@pytest.fixture
def listening(pg_engine: Engine, channel: str) -> Iterator[Wakeups]:
    wakeups = Wakeups(make_sessions(pg_engine), channel)
    with wakeups:
        assert wakeups.listener is not None and wakeups.listener.connected.wait(10)
        wakeups.wakeup.wait(0)  # the wake-up every (re)connection makes
        yield wakeups


def woken_within(wakeups: Wakeups, send: Callable[[], None], timeout_s: float) -> float:
    """Seconds from `send()` to the wake-up; fails if none comes within `timeout_s`."""
    started = time.perf_counter()
    send()
    assert wakeups.wakeup.wait(timeout_s), f"no wake-up within {timeout_s} s"
    return time.perf_counter() - started


@pytest.mark.integration
def test_pg_a_notify_from_another_connection_wakes_the_listener_within_100_ms(
    listening: Wakeups, pg_engine: Engine, channel: str
) -> None:
    delays = [woken_within(listening, lambda: send_notify(pg_engine, channel), 1.0) for _ in range(5)]
    assert min(delays) < 0.1, f"wake-ups took {[round(d * 1000) for d in delays]} ms"


@pytest.mark.integration
def test_pg_the_listener_reconnects_after_postgresql_drops_it(
    listening: Wakeups, pg_engine: Engine, channel: str
) -> None:
    listener = listening.listener
    assert listener is not None
    with pg_engine.begin() as conn:
        killed = (
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = :listen"),
                {"listen": f'LISTEN "{channel}"'},
            )
            .scalars()
            .all()
        )
    assert list(killed) == [True]
    # The reconnection itself wakes the channel (what was sent meanwhile is lost), then NOTIFYs flow again.
    assert listening.wakeup.wait(15), "the listener did not reconnect"
    assert listener.connected.wait(5)
    woken_within(listening, lambda: send_notify(pg_engine, channel), 1.0)


def test_a_commit_wakes_this_process_and_a_rollback_wakes_nobody(sessions: sessionmaker[Session], channel: str) -> None:
    wakeup = subscribe(channel)
    with transaction(sessions) as session:
        notify(session, channel, "x")
        assert not wakeup.wait(0.05), "woken before the commit: the rows would not be visible yet"
    assert wakeup.wait(1.0)

    with pytest.raises(RuntimeError), transaction(sessions) as session:
        notify(session, channel, "x")
        raise RuntimeError("the writer fails")
    assert not wakeup.wait(0.2)


def test_sqlite_has_no_listener_and_waits_out_its_interval(sessions: sessionmaker[Session], channel: str) -> None:
    wakeups = Wakeups(sessions, channel)
    if sessions.kw["bind"].dialect.name != "sqlite":
        assert wakeups.listener is not None
        return
    assert wakeups.listener is None
    stop = threading.Event()
    with wakeups:
        started = time.perf_counter()
        assert wakeups.next_pass(0.3, stop)  # the fallback: a pass after the interval
        assert time.perf_counter() - started >= 0.29
        stop.set()
        assert not wakeups.next_pass(5.0, stop)  # a stop ends the wait at once


def serving_notifications(engine: Engine, pipeline: str) -> tuple[Callable[[], list[str]], Callable[[], None]]:
    """(heard, close): the serving channel's payloads naming `pipeline` that another connection
    receives (PostgreSQL), or the in-process wake-ups, counted as that name (SQLite)."""
    if engine.dialect.name == "postgresql":
        other = psycopg.connect(conninfo(engine), autocommit=True)
        other.execute(f'LISTEN "{SERVING_CHANNEL}"')
        return lambda: [n.payload for n in other.notifies(timeout=0.5) if n.payload == pipeline], other.close
    wakeup = subscribe(SERVING_CHANNEL)
    return lambda: [pipeline] if wakeup.wait(0.5) else [], lambda: None


def register(sessions: sessionmaker[Session], pipeline: str, sha: str) -> e.ModelVersion:
    return tx(
        sessions,
        lambda s: repo.register_model_version(
            s, pipeline, artifact_uri=f"file:///m/{sha[:4]}.pt", sha256=sha, size_bytes=10, metrics={}
        ),
    )


def test_moving_the_champion_or_a_rollout_notifies_the_serving_channel(
    sessions: sessionmaker[Session], engine: Engine
) -> None:
    name = f"notified-{uuid.uuid4().hex[:6]}"
    spec = {"name": name, "dataset": "digits", "model": {"architecture": "mlp"}}
    tx(sessions, lambda s: repo.upsert_pipeline(s, name, "digits", spec))
    v1, v2 = (register(sessions, name, sha) for sha in (SHA_A, SHA_B))
    heard, close = serving_notifications(engine, name)
    try:
        tx(sessions, lambda s: repo.move_champion(s, name, v1.id, expected_from_version_id=None, actor="t", reason="1"))
        assert heard() == [name]
        rollout = tx(
            sessions,
            lambda s: repo.start_rollout(
                s, name, candidate_version_id=v2.id, champion_version_id=v1.id, policy={"steps": [10, 50, 100]}
            ),
        )
        assert heard() == [name]
        step = {"step_index": 0, "traffic_percent": 10, "verdict": e.Verdict.PASS}
        tx(sessions, lambda s: repo.record_rollout_step(s, rollout.id, **step))  # type: ignore[arg-type]
        assert heard() == [name]
        tx(sessions, lambda s: repo.finish_rollout(s, rollout.id, e.RolloutStatus.ROLLED_BACK, "test"))
        assert heard() == [name]
        tx(sessions, lambda s: repo.list_model_versions(s, name))
        assert heard() == []  # a read moves nothing: no notification
    finally:
        close()
