"""`retrainer consume` serves /healthz and /metrics on RETRAINER_HEALTH_ADDRESS, and its health
fails, naming the topic, when the topic does not exist (the real broker: automatic topic creation
is off, as in production), and naming the bootstrap servers when no broker answers (a closed port:
the shared broker is never stopped here). A consumer connected to the real broker stays healthy
while its topic is idle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

import migrations
from consumers.consumer import SESSION_TIMEOUT_MS, DataChangeConsumer, broker_connected
from domain.errors import TransientInfraError
from domain.settings import load_settings
from flows.loop import LoopPassFailed, run_loop
from retrainer.service import free_port
from storage.db import create_db_engine, make_sessions
from tests.consumers.conftest import Stage

pytestmark = pytest.mark.integration


def test_a_topic_that_does_not_exist_fails_healthz_naming_it(kafka_bootstrap: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'retrainer.db'}"
    migrations.upgrade(url)
    topic = f"retrainer.missing-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        **os.environ,
        "RETRAINER_DATABASE_URL": url,
        "RETRAINER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RETRAINER_KAFKA_TOPIC": topic,
        "RETRAINER_KAFKA_CONSUMER_GROUP": f"health-{uuid.uuid4().hex[:8]}",
        "RETRAINER_HEALTH_ADDRESS": f"127.0.0.1:{port}",
    }
    log_path = tmp_path / "consume.log"
    command = [str(Path(sys.executable).parent / "retrainer"), "consume"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            body, metrics = _failing_health(port, process, log_path)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
    assert code == 0, log_path.read_text()[-3000:]
    assert body["status"] == "unavailable" and body["error"]["code"] == "unhealthy"
    check = body["checks"]["kafka-consumer"]
    assert check["code"] == "configuration_error"  # the failure's own code: a setting to fix, not an outage
    assert f"kafka-consumer: last pass failed (ConfigurationError: topic {topic!r} does not exist" in check["message"]
    assert body["checks"]["database"] == {"status": "ok"}
    assert f'retrainer_consumer_partitions_assigned{{topic="{topic}"}} 0.0' in metrics
    assert 'retrainer_loop_passes_total{outcome="failed",service="kafka-consumer"}' in metrics


def _failing_health(port: int, process: subprocess.Popen[bytes], log_path: Path) -> tuple[dict, str]:  # type: ignore[type-arg]
    deadline = time.monotonic() + 60  # the session timeout (10 s) first, then one failed pass
    while True:
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        except httpx.HTTPError:
            answer = None
        if answer is not None and answer.status_code == 503:
            return answer.json(), httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        time.sleep(0.5)


@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'retrainer.db'}"
    migrations.upgrade(url)
    return make_sessions(create_db_engine(url))


def test_a_broker_that_does_not_answer_fails_the_pass_and_healthz_naming_the_servers(
    sqlite_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    servers = f"127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RETRAINER_KAFKA_BOOTSTRAP_SERVERS", servers)
    consumer = DataChangeConsumer(load_settings(), sqlite_sessions, bootstrap_timeout_ms=1000)  # connects nothing yet
    stop = threading.Event()
    with pytest.raises(TransientInfraError) as down:
        run_loop(consumer, stop, once=True, health=consumer.health)
    assert down.value.code == "infrastructure_unavailable"
    assert f"Kafka at {servers}: no broker answered" in down.value.message
    assert "RETRAINER_KAFKA_BOOTSTRAP_SERVERS" in down.value.message
    with pytest.raises(LoopPassFailed) as unhealthy:
        consumer.probe()
    assert unhealthy.value.code == "infrastructure_unavailable" and servers in unhealthy.value.message
    consumer.close()  # nothing to close: never connected


def test_a_connected_consumer_on_an_idle_topic_stays_healthy(stage: Stage) -> None:
    consumer = DataChangeConsumer(stage.settings, stage.sessions)
    try:
        until = time.monotonic() + SESSION_TIMEOUT_MS / 1000 + 3  # past the grace of the broker check
        while time.monotonic() < until:
            assert consumer.run_once().records == 0
        assert broker_connected(consumer.consumer)
        consumer.probe()
    finally:
        consumer.close()
