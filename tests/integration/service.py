"""`retrainer serve` as a subprocess for integration tests: started with the current environment,
healthy before the body runs, stopped with SIGTERM and required to exit 0; and a reader of the
decisions topic that `retrainer serve` or `retrainer relay` publishes to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from kafka import KafkaConsumer

from domain.settings import Settings, load_settings
from retrainer import demo as story
from retrainer.service import free_port

START_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Stack:
    """What a story through `retrainer serve` needs: the settings it runs with, the API and model
    server addresses, and the data versions as s3:// URIs."""

    settings: Settings
    api: str
    serving: str
    data: dict[str, str]


def production_stack(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    database: str,
    s3_endpoint_url: str,
    kafka_bootstrap: str,
    prefix: str,
    files: dict[str, Path],
) -> Stack:
    """The environment of `retrainer serve` on PostgreSQL, MinIO and Kafka (embedded defaults for the
    rest), its topics created, and `files` uploaded under s3://datasets/<prefix>-<random>/."""
    suffix = f"{prefix}-{uuid.uuid4().hex[:8]}"
    api, serving = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        **story.demo_environment(tmp_path / "home"),
        "RETRAINER_DATABASE_URL": database,
        "RETRAINER_ARTIFACT_ROOT": f"s3://retrainer-test/{suffix}",
        "RETRAINER_S3_ENDPOINT_URL": s3_endpoint_url,
        "RETRAINER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RETRAINER_API_ADDRESS": api,
        "RETRAINER_SERVING_ADDRESS": serving,
        "RETRAINER_LOG_LEVEL": "INFO",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the service starts its own Prefect server
    settings = load_settings()
    story.create_topics(settings)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint_url)
    data = {}
    for key, path in files.items():
        s3.upload_file(str(path), "datasets", f"{suffix}/{path.name}")
        data[key] = f"s3://datasets/{suffix}/{path.name}"
    return Stack(settings, api, serving, data)


@contextmanager
def retrainer_serve(api_address: str, log_path: Path) -> Iterator[dict[str, dict[str, str]]]:
    """Runs `retrainer serve` (RETRAINER_* from os.environ) and yields its /healthz checks."""
    retrainer = str(Path(sys.executable).parent / "retrainer")
    with log_path.open("wb") as out:
        service = subprocess.Popen([retrainer, "serve"], env={**os.environ}, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield _wait_healthy(f"http://{api_address}/healthz", service, log_path)
        finally:
            service.send_signal(signal.SIGTERM)
            try:
                code = service.wait(timeout=60)
            except subprocess.TimeoutExpired as hung:
                service.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack into the log
                time.sleep(1)
                service.kill()
                service.wait(timeout=10)
                raise AssertionError(
                    f"retrainer serve did not stop within 60 s:\n{log_path.read_text()[-6000:]}"
                ) from hung
    assert code == 0, log_path.read_text()[-3000:]


def _wait_healthy(url: str, service: subprocess.Popen[bytes], log: Path) -> dict[str, dict[str, str]]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert service.poll() is None, log.read_text()[-3000:]
        try:
            answer = httpx.get(url, timeout=2)
            if answer.status_code == 200:
                body: dict[str, dict[str, str]] = answer.json()["checks"]
                return body
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)


@dataclass(frozen=True)
class DecisionRecord:
    """One record of the decisions topic: its CloudEvent id, type and data, and its Kafka key."""

    id: str
    type: str
    data: dict[str, Any]
    key: bytes | None


def read_decisions(bootstrap: str, topic: str, expected: set[str], timeout_s: float = 20) -> list[DecisionRecord]:
    """Every record of `topic` from the beginning (duplicates kept), read by a fresh consumer group
    until each CloudEvent id in `expected` is there or `timeout_s` has passed."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"story-reader-{uuid.uuid4().hex[:6]}",
        consumer_timeout_ms=3000,
    )
    records: list[DecisionRecord] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not expected <= {r.id for r in records}:
            for record in consumer:
                event = json.loads(record.value)
                records.append(DecisionRecord(event["id"], event["type"], event["data"], record.key))
    finally:
        consumer.close()
    return records
