"""Shared fixtures: where the real services are, and how a missing one is reported."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from retrainer.wiring import quiet_prefect

POSTGRES_URL = os.environ.get(
    "RETRAINER_TEST_POSTGRES_URL", "postgresql+psycopg://retrainer:retrainer@127.0.0.1:5432/retrainer_test"
)
S3_ENDPOINT_URL = os.environ.get("RETRAINER_TEST_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
KAFKA_BOOTSTRAP = os.environ.get("RETRAINER_TEST_KAFKA", "127.0.0.1:9092")
REQUIRE_SERVICES = os.environ.get("RETRAINER_REQUIRE_SERVICES") == "1"
# The health/metrics port of `retrainer consume`, `triggers` and `rollout supervise` run as
# subprocesses: a free one, so tests never collide with each other or a running service.
os.environ.setdefault("RETRAINER_HEALTH_ADDRESS", "127.0.0.1:0")
# Prefect telemetry off in the test harness's server too, as in everything Retrainer starts.
quiet_prefect()


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, url: str, default_port: int) -> None:
    """Skips (or, under make test, fails) when the service does not accept connections."""
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    if _reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}; start it with `make services`"
    if REQUIRE_SERVICES:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    require_service("PostgreSQL", POSTGRES_URL, 5432)
    return POSTGRES_URL


@pytest.fixture(scope="session")
def s3_endpoint_url() -> str:
    require_service("MinIO (S3)", S3_ENDPOINT_URL, 9000)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "retrainer")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "retrainer-secret")
    return S3_ENDPOINT_URL


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    require_service("Kafka", KAFKA_BOOTSTRAP, 9092)
    return KAFKA_BOOTSTRAP


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A real Prefect API for the session (Prefect's test harness: a temporary local server); yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())
