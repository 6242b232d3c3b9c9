"""`retrainer consume` serves /healthz and /metrics on RETRAINER_HEALTH_ADDRESS, and its health
fails, naming the topic, when the topic does not exist (the real broker: automatic topic creation
is off, as in production)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

import migrations
from retrainer.service import free_port

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
    assert check["code"] == "infrastructure_unavailable"
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
