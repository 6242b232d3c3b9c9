"""The service scripts are idempotent, exit 0 when they started what was down, give a running broker
its topics whoever started it, and say clearly when they cannot start."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from consumers.health import check_kafka

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("postgres", "minio", "kafka")


def script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=180
    )


@pytest.mark.integration
def test_second_start_while_running_changes_nothing(
    postgres_url: str, s3_endpoint_url: str, kafka_bootstrap: str
) -> None:
    result = script("infra/local/services.sh", "start")
    assert result.returncode == 0, result.stderr
    for name in SERVICES:
        assert f"[{name}] already up" in result.stdout
    assert "created topics" not in result.stderr  # the contract's topics were there already
    status = script("infra/local/services.sh", "status")
    assert status.returncode == 0 and status.stdout.count(": up on 127.0.0.1") == 3


@pytest.fixture
def fresh_topics(kafka_bootstrap: str) -> Iterator[tuple[str, str]]:
    """Names of an event topic and a dead-letter topic that do not exist yet; deleted afterwards."""
    topic = f"retrainer.test-services-{uuid.uuid4().hex[:8]}"
    names = (topic, f"{topic}.dead-letters")
    yield names
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.delete_topics([name for name in names if name in admin.list_topics()])
    finally:
        admin.close()


@pytest.mark.integration
def test_start_with_the_broker_already_up_creates_the_missing_topics(
    postgres_url: str, s3_endpoint_url: str, kafka_bootstrap: str, fresh_topics: tuple[str, str]
) -> None:
    """After `make demo` started the broker for a topic of its own, `make services` found it up and
    skipped topic creation; `retrainer serve` then consumed a topic that did not exist."""
    topic, dead_letters = fresh_topics
    env = {"RETRAINER_KAFKA_TOPIC": topic, "RETRAINER_KAFKA_DLQ_TOPIC": dead_letters}

    first = script("infra/local/services.sh", "start", **env)
    assert first.returncode == 0, first.stderr
    assert "[kafka] already up" in first.stdout
    assert f"created topics: {topic} {dead_letters}" in first.stderr
    assert check_kafka(kafka_bootstrap, [topic, dead_letters]) == {topic: 3, dead_letters: 1}

    second = script("infra/local/services.sh", "start", **env)
    assert second.returncode == 0, second.stderr
    assert "created topics" not in second.stderr
    assert check_kafka(kafka_bootstrap, [topic, dead_letters]) == {topic: 3, dead_letters: 1}


def _stub_scripts(folder: Path, up: set[str]) -> Path:
    """services.sh beside stand-ins for the three service scripts: `health` answers from `up`, every
    call is appended to calls.log. Only the orchestration in services.sh runs for real."""
    shutil.copy(ROOT / "infra" / "local" / "services.sh", folder)
    calls = folder / "calls.log"
    for name in SERVICES:
        stub = folder / f"{name}.sh"
        healthy = "exit 0" if name in up else "exit 1"
        stub.write_text(
            f'#!/usr/bin/env bash\necho "{name} $1" >>"{calls}"\n'
            f'case "$1" in health) {healthy} ;; start|topics) echo "[{name}] ready" >&2 ;; esac\n'
        )
        stub.chmod(0o755)
    return calls


def test_start_exits_0_after_starting_what_was_down(tmp_path: Path) -> None:
    """Under `set -e`, a trailing `[[ -n "$record" ]] && …` made the script exit 1 after it started
    the broker without --record, so `make services` (and `make bench` after it) stopped there."""
    calls = _stub_scripts(tmp_path, up={"postgres"})
    result = subprocess.run(
        ["bash", str(tmp_path / "services.sh"), "start"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert calls.read_text().split("\n") == [
        "postgres health",
        "minio health",
        "minio start",
        "kafka health",
        "kafka start",
        "",
    ]


def test_start_records_only_what_it_started_and_gives_a_running_broker_its_topics(tmp_path: Path) -> None:
    calls = _stub_scripts(tmp_path, up={"kafka"})
    record = tmp_path / "started.txt"
    result = subprocess.run(
        ["bash", str(tmp_path / "services.sh"), "start", "--record", str(record)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert record.read_text().split() == ["postgres", "minio"]
    assert "kafka topics" in calls.read_text().splitlines()
    assert "kafka start" not in calls.read_text().splitlines()


@pytest.mark.integration
def test_a_taken_port_is_named_not_fought_over(postgres_url: str) -> None:
    # Ask MinIO to start on PostgreSQL's port: the script refuses and says what to change.
    result = script(
        "infra/local/minio.sh", "start", RETRAINER_MINIO_PORT="5432", RETRAINER_CACHE_DIR=str(ROOT / ".cache")
    )
    assert result.returncode == 1
    assert "already listens on 127.0.0.1:5432" in result.stderr and "RETRAINER_MINIO_PORT" in result.stderr
