"""The consumer against the real broker and PostgreSQL: kcat as an outside producer, debounced
run creation, the dead-letter topic, a SIGKILLed consumer and a restarted broker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from consumers.consumer import DataChangeConsumer
from domain import entities as e
from domain.errors import TransientInfraError
from flows.triggers import process_pending_events
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from storage.orm import SqlEvent
from tests.consumers.conftest import Stage

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def drain(stage: Stage, until: int, timeout: float = 60) -> DataChangeConsumer:
    """Runs a consumer until `until` events are in the inbox."""
    consumer = DataChangeConsumer(stage.settings, stage.sessions)
    deadline = time.monotonic() + timeout
    try:
        while stage.inbox_count() < until:
            assert time.monotonic() < deadline, f"only {stage.inbox_count()} of {until} events arrived"
            consumer.run_once()
    finally:
        consumer.close()
    return consumer


def runs_of(stage: Stage) -> list:  # type: ignore[type-arg]
    with transaction(stage.sessions) as session:
        return repo.list_runs(session, stage.pipeline, limit=100)


def test_kcat_structured_and_binary_events_each_trigger_a_run(stage: Stage) -> None:
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed (infra/local/test.sh installs it)"
    topic, servers = stage.settings.kafka_topic, stage.settings.kafka_bootstrap_servers
    structured = json.dumps(
        {
            "specversion": "1.0",
            "id": f"{stage.dataset}-structured",
            "source": "//kcat",
            "type": "retrainer.data.changed",
            "data": {"dataset": stage.dataset, "uri": "s3://d/v1.csv"},
        }
    )
    subprocess.run(
        [
            kcat,
            "-P",
            "-b",
            servers,
            "-t",
            topic,
            "-k",
            stage.dataset,
            "-H",
            "content-type=application/cloudevents+json",
        ],
        input=structured.encode(),
        check=True,
        timeout=30,
    )
    drain(stage, 1)
    (first,) = process_pending_events(stage.sessions, datasets=[stage.dataset])
    assert first.created and first.run.event_ids == (f"{stage.dataset}-structured",)
    with transaction(stage.sessions) as session:  # that run has finished (while_running: queue waits otherwise)
        repo.update_run(session, first.run.id, status=e.RunStatus.REJECTED)

    headers = [
        "ce_specversion=1.0",
        f"ce_id={stage.dataset}-binary",
        "ce_source=//kcat",
        "ce_type=retrainer.data.changed",
        "content-type=application/json",
    ]
    subprocess.run(
        [kcat, "-P", "-b", servers, "-t", topic, "-k", stage.dataset, *[arg for h in headers for arg in ("-H", h)]],
        input=json.dumps({"dataset": stage.dataset, "uri": "s3://d/v2.csv"}).encode(),
        check=True,
        timeout=30,
    )
    drain(stage, 1)
    (second,) = process_pending_events(stage.sessions, datasets=[stage.dataset])
    assert second.created and second.run.event_ids == (f"{stage.dataset}-binary",)


def test_500_events_in_one_window_make_one_run_linked_to_all(stage: Stage) -> None:
    stage.produce([stage.valid(f"e{i:04d}") for i in range(500)])
    drain(stage, 500)
    results = process_pending_events(stage.sessions, datasets=[stage.dataset])
    assert [r.created for r in results] == [True]
    assert len(results[0].run.event_ids) == 500
    assert process_pending_events(stage.sessions, datasets=[stage.dataset]) == []  # nothing left pending
    assert len(runs_of(stage)) == 1


def test_debounce_waits_for_a_quiet_period(stage: Stage) -> None:
    with transaction(stage.sessions) as session:
        spec = repo.get_pipeline(session, stage.pipeline).spec
        spec["triggers"] = {"events": {"debounce_seconds": 60, "max_wait_seconds": 120}}
        repo.upsert_pipeline(session, stage.pipeline, stage.dataset, spec)
    stage.produce([stage.valid(f"w{i}") for i in range(3)])
    drain(stage, 3)
    assert process_pending_events(stage.sessions, datasets=[stage.dataset]) == []  # still inside the quiet period
    later = datetime.now(UTC) + timedelta(seconds=61)
    (result,) = process_pending_events(stage.sessions, now=later, datasets=[stage.dataset])
    assert result.created and len(result.run.event_ids) == 3


def test_malformed_records_go_to_the_dlq_and_valid_ones_still_trigger(stage: Stage) -> None:
    bad = [(b"not json %d" % i, [("content-type", b"application/cloudevents+json")]) for i in range(150)]
    bad += [
        (
            json.dumps({"specversion": "1.0", "id": f"x{i}", "source": "s", "type": "wrong"}).encode(),
            [("content-type", b"application/cloudevents+json")],
        )
        for i in range(50)
    ]
    stage.produce(bad + [stage.valid(f"ok{i}") for i in range(5)])
    drain(stage, 5)
    dead = stage.dlq(200)
    assert len(dead) == 200
    headers = dict(dead[0].headers)  # type: ignore[attr-defined]
    assert headers["retrainer-error"].startswith(b"not_json")
    assert headers["retrainer-original-topic"] == stage.settings.kafka_topic.encode()
    assert {"retrainer-original-partition", "retrainer-original-offset"} <= set(headers)
    reasons = {dict(r.headers)["retrainer-error"].split(b":")[0] for r in dead}  # type: ignore[attr-defined]
    assert reasons == {b"not_json", b"wrong_type"}
    (result,) = process_pending_events(stage.sessions, datasets=[stage.dataset])
    assert len(result.run.event_ids) == 5


def test_a_sigkilled_consumer_loses_nothing_and_doubles_nothing(stage: Stage) -> None:
    # Enough events that the kill lands mid-stream: the consumer stores thousands a second, so it is
    # killed as soon as its first batch is in (CI once saw all 2,000 stored before a kill at 300).
    total = 6000
    stage.produce([stage.valid(f"k{i:04d}") for i in range(total)])
    env = {**os.environ, "RETRAINER_LOG_LEVEL": "WARNING"}
    command = [str(Path(sys.executable).parent / "retrainer"), "consume", "--max-records", "100"]
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while stage.inbox_count() < 100:
        assert time.monotonic() < deadline and first.poll() is None, "consumer made no progress"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)  # mid-stream, no cleanup, no commit
    first.wait(10)
    assert stage.inbox_count() < total
    second = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while stage.inbox_count() < total:
            assert time.monotonic() < deadline, f"stuck at {stage.inbox_count()} events"
            time.sleep(0.2)
    finally:
        second.send_signal(signal.SIGTERM)  # graceful: finish the batch, commit, leave the group
        assert second.wait(30) == 0
    with transaction(stage.sessions) as session:
        count = session.scalar(select(func.count()).select_from(SqlEvent).where(SqlEvent.dataset == stage.dataset))
    assert count == total  # none lost, none doubled (the inbox is unique on the event id)
    assert len(process_pending_events(stage.sessions, datasets=[stage.dataset])) == 1 and len(runs_of(stage)) == 1


def test_a_batch_whose_pass_fails_after_the_poll_is_delivered_again(stage: Stage) -> None:
    """The database goes away between the poll and the insert (here: reading the known datasets);
    the batch is rewound, so the pass after the outage stores it rather than polling past it."""
    stage.produce([stage.valid(f"r{i}") for i in range(5)])
    consumer = DataChangeConsumer(stage.settings, stage.sessions)
    database = consumer.sessions
    consumer.sessions = make_sessions(create_db_engine("postgresql+psycopg://retrainer:retrainer@127.0.0.1:1/down"))
    try:
        failure = _first_failed_pass(consumer)
        assert isinstance(failure, TransientInfraError) and "127.0.0.1:1" in failure.message
        consumer.sessions = database  # the database is back
        deadline = time.monotonic() + 30
        while stage.inbox_count() < 5:
            assert time.monotonic() < deadline, f"only {stage.inbox_count()} of 5 events after the outage"
            consumer.run_once()
    finally:
        consumer.close()


def _first_failed_pass(consumer: DataChangeConsumer) -> BaseException:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            consumer.run_once()  # empty polls until the group is joined and the records come
        except Exception as failure:
            return failure
    raise AssertionError("no batch reached the consumer")


def test_consumption_resumes_by_itself_after_a_broker_restart(stage: Stage) -> None:
    consumer = DataChangeConsumer(stage.settings, stage.sessions)
    worker = threading.Thread(target=consumer.run_forever, daemon=True)
    worker.start()
    try:
        stage.produce([stage.valid(f"before{i}") for i in range(20)])
        deadline = time.monotonic() + 60
        while stage.inbox_count() < 20:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        kafka = ROOT / "infra" / "local" / "kafka.sh"
        subprocess.run(["bash", str(kafka), "stop"], check=True, timeout=60, capture_output=True)
        time.sleep(2)
        subprocess.run(["bash", str(kafka), "start"], check=True, timeout=180, capture_output=True)
        stage.produce([stage.valid(f"after{i}") for i in range(20)])
        deadline = time.monotonic() + 120
        while stage.inbox_count() < 40:
            assert time.monotonic() < deadline, f"only {stage.inbox_count()} of 40 after the restart"
            time.sleep(0.2)
    finally:
        consumer.stop_requested.set()
        worker.join(30)
