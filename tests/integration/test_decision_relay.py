"""The decision relay as its own process, killed while it relays: `retrainer relay` (RETRAINER_* settings
only) reads the outbox of a PostgreSQL database of the test's own and publishes to a decisions topic of
the test's own on the real broker. Decisions keep being made while it runs; it is SIGKILLed mid-stream,
more decisions are made while it is dead, and a second `retrainer relay` takes over. A reader of the
topic then sees every outbox event, none missing, exactly once after deduplication by CloudEvent id
(some may arrive twice: the batch the first relay had published but not yet marked sent)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.integration.service import read_decisions

PIPELINE = "relayed-story"
RUNS_PER_DECISION = 10  # each run: created, then started (two events)


@pytest.fixture
def sessions(e2e_database: str) -> sessionmaker[Session]:
    migrations.upgrade(e2e_database)
    made = make_sessions(create_db_engine(e2e_database))
    with transaction(made) as session:
        spec = {"name": PIPELINE, "dataset": "d", "model": {"architecture": "mlp"}}
        repo.upsert_pipeline(session, PIPELINE, "d", spec)
    return made


def _decide(sessions: sessionmaker[Session]) -> None:
    """A batch of real decisions in one transaction: runs created, then started."""
    with transaction(sessions) as session:
        for _ in range(RUNS_PER_DECISION):
            run, _ = repo.create_run(session, PIPELINE, e.TriggerKind.MANUAL, reason="relay story")
            repo.update_run(session, run.id, status=e.RunStatus.RUNNING)


def _counts(sessions: sessionmaker[Session]) -> tuple[int, int]:
    """(sent, unsent) outbox events."""
    with transaction(sessions) as session:
        return len(repo.outbox_events(session, sent=True)), len(repo.outbox_events(session, sent=False))


def _relay(database: str, bootstrap: str, topic: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RETRAINER_DATABASE_URL": database,
        "RETRAINER_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "RETRAINER_DECISIONS_TOPIC": topic,
        "RETRAINER_HEALTH_ADDRESS": "127.0.0.1:0",
        "RETRAINER_LOG_FORMAT": "console",
    }
    retrainer = str(Path(sys.executable).parent / "retrainer")
    with log.open("ab") as out:
        return subprocess.Popen(
            [retrainer, "relay", "--interval", "0.05"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _wait(
    condition: str, check: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert process.poll() is None, f"retrainer relay exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{condition} within {timeout_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def test_a_relay_killed_mid_stream_loses_nothing_and_a_consumer_dedupes_by_id(
    e2e_database: str, sessions: sessionmaker[Session], kafka_bootstrap: str, decisions_topic: str, tmp_path: Path
) -> None:
    log = tmp_path / "relay.log"
    deciding = threading.Event()
    deciding.set()

    def keep_deciding() -> None:
        while deciding.is_set():
            _decide(sessions)

    decider = threading.Thread(target=keep_deciding, name="decisions", daemon=True)
    _decide(sessions)
    first = _relay(e2e_database, kafka_bootstrap, decisions_topic, log)
    try:
        decider.start()
        # killed once it has relayed some batches while decisions keep arriving: mid-stream
        _wait("the first relay sent 200 events", lambda: _counts(sessions)[0] >= 200, first, log, 40)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        deciding.clear()
        decider.join(timeout=30)
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    _decide(sessions)  # decided while no relay runs: these wait in the outbox
    sent_before, unsent = _counts(sessions)
    assert sent_before >= 200 and unsent >= 2 * RUNS_PER_DECISION

    second = _relay(e2e_database, kafka_bootstrap, decisions_topic, log)
    try:
        _wait("the second relay sent every event", lambda: _counts(sessions)[1] == 0, second, log, 40)
    finally:
        second.send_signal(signal.SIGTERM)
        code = second.wait(timeout=30)
    assert code == 0, log.read_text()[-3000:]

    with transaction(sessions) as session:
        outbox = {event.id for event in repo.outbox_events(session)}
    records = read_decisions(kafka_bootstrap, decisions_topic, outbox)
    ids, keys = [r.id for r in records], {r.key for r in records}
    assert set(ids) == outbox  # none missing, none foreign
    assert len(ids) >= len(outbox)  # at least once: a batch published but not marked sent comes again
    assert keys == {PIPELINE.encode()}
