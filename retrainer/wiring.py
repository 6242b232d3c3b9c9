"""Builds the real components from settings: engine, sessions, artifact store, health probes.

The one place that knows which concrete classes serve which setting; commands and (later)
`retrainer serve` get their dependencies from here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import httpx
from sqlalchemy import Engine, inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain.errors import ArtifactIntegrityError, RetrainerError, TransientInfraError
from domain.settings import Settings
from storage import db
from storage.artifacts import ArtifactStore, open_artifact_store
from storage.db import check_database, create_db_engine, make_sessions, redacted, translate_db_error


@functools.cache
def engine(settings: Settings) -> Engine:
    return create_db_engine(settings.database_url, connect_timeout=settings.connect_timeout_seconds)


def sessions(settings: Settings) -> sessionmaker[Session]:
    return make_sessions(engine(settings))


def artifact_store(settings: Settings) -> ArtifactStore:
    return open_artifact_store(settings.artifact_root, settings)


PREFECT_QUIET_ENV = {
    # The server's telemetry heartbeat writes to its SQLite database and, under load, fails with
    # "database is locked" tracebacks in `retrainer run`; analytics leave the machine. Off for every
    # Prefect process Retrainer starts (they inherit this environment) unless set explicitly.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
}


def quiet_prefect() -> None:
    """Prefect telemetry and analytics off in this process and its children; call before importing prefect."""
    for name, value in PREFECT_QUIET_ENV.items():
        os.environ.setdefault(name, value)


def prefect_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def prefect_probe(api_url: str) -> Callable[[], None]:
    """A /healthz probe: the Prefect API at `api_url` answers."""

    def probe() -> None:
        if not prefect_healthy(api_url):
            raise TransientInfraError(f"Prefect API at {api_url} does not answer (PREFECT_API_URL)")

    return probe


def model_server_probe(serving_url: str) -> Callable[[], None]:
    """A /healthz probe: the model server at `serving_url` is live."""

    def probe() -> None:
        try:
            response = httpx.get(f"{serving_url}/v2/health/live", timeout=2.0)
        except httpx.HTTPError as err:
            raise TransientInfraError(f"model server at {serving_url} does not answer ({err})") from err
        if response.status_code != 200:
            raise TransientInfraError(f"model server at {serving_url}: HTTP {response.status_code}")

    return probe


def database_probe(settings: Settings) -> Callable[[], None]:
    """A /healthz probe: the metadata database of RETRAINER_DATABASE_URL answers (`storage.db.database_probe`)."""
    return db.database_probe(sessions(settings))


def redacted_db(settings: Settings) -> str:
    return redacted(settings.database_url)


def upgrade_database(settings: Settings, revision: str = "head") -> None:
    """Checks the connection first (a clear one-line error), then runs Alembic."""
    check_database(engine(settings))
    try:
        migrations.upgrade(settings.database_url, revision)
    except SQLAlchemyError as e:
        raise translate_db_error(e, settings.database_url) from e


def current_revision(settings: Settings) -> str:
    from alembic.migration import MigrationContext

    with engine(settings).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() or "base (empty)"


def _probe_database(settings: Settings) -> str:
    check_database(engine(settings))
    with engine(settings).connect() as conn:
        tables = len(inspect(conn).get_table_names())
    return f"{redacted_db(settings)} ({tables} tables, revision {current_revision(settings)})"


def _probe_artifacts(settings: Settings) -> str:
    artifact_store(settings).check()
    return settings.artifact_root


def _probe_kafka(settings: Settings) -> str:
    from consumers.health import check_kafka

    topics = check_kafka(
        settings.kafka_bootstrap_servers,
        [settings.kafka_topic, settings.kafka_dlq_topic],
        settings.connect_timeout_seconds,
    )
    return ", ".join(f"{name} ({count} partitions)" for name, count in topics.items())


def dependency_probes(settings: Settings) -> list[tuple[str, str, Callable[[], str]]]:
    return [
        ("database", "RETRAINER_DATABASE_URL", lambda: _probe_database(settings)),
        ("artifacts", "RETRAINER_ARTIFACT_ROOT", lambda: _probe_artifacts(settings)),
        ("kafka", "RETRAINER_KAFKA_BOOTSTRAP_SERVERS", lambda: _probe_kafka(settings)),
    ]


# ------------------------------------------------------------------ demo steps (foundation)


def demo_database(settings: Settings) -> str:
    upgrade_database(settings)
    return f"{redacted_db(settings)} at revision {current_revision(settings)}"


def demo_artifacts(settings: Settings) -> str:
    store = artifact_store(settings)
    store.check()
    payload = b"retrainer demo artifact\n"
    ref = store.put_bytes(payload)
    if store.read_bytes(ref) != payload:
        raise RetrainerError(f"artifact {ref.uri} read back different bytes")
    wrong_digest = type(ref)(uri=ref.uri, key=ref.key, sha256="0" * 64, size=ref.size)
    try:
        store.read_bytes(wrong_digest)
    except ArtifactIntegrityError:
        pass
    else:
        raise RetrainerError(f"artifact {ref.uri} was accepted under a wrong digest")
    return f"{ref.uri} (sha256 {ref.sha256[:12]}…); a read with the wrong digest was refused"
