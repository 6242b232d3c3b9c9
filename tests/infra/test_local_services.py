"""The service scripts are idempotent and say clearly when they cannot start."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        ["bash", *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=180
    )


def test_second_start_while_running_changes_nothing(
    postgres_url: str, s3_endpoint_url: str, kafka_bootstrap: str
) -> None:
    result = script("infra/local/services.sh", "start")
    assert result.returncode == 0, result.stderr
    for name in ("postgres", "minio", "kafka"):
        assert f"[{name}] already up" in result.stdout
    status = script("infra/local/services.sh", "status")
    assert status.returncode == 0 and status.stdout.count(": up on 127.0.0.1") == 3


def test_a_taken_port_is_named_not_fought_over(postgres_url: str) -> None:
    # Ask MinIO to start on PostgreSQL's port: the script refuses and says what to change.
    result = script(
        "infra/local/minio.sh", "start", RETRAINER_MINIO_PORT="5432", RETRAINER_CACHE_DIR=str(ROOT / ".cache")
    )
    assert result.returncode == 1
    assert "already listens on 127.0.0.1:5432" in result.stderr and "RETRAINER_MINIO_PORT" in result.stderr
