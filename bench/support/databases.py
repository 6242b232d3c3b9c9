"""Databases for benchmarks: a migrated SQLite file, or a PostgreSQL database of the benchmark's own
(created on the server at RETRAINER_BENCH_POSTGRES_URL, default the local test server, and dropped
afterwards), so a benchmark never sees or touches anyone else's rows."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get(
    "RETRAINER_BENCH_POSTGRES_URL",
    os.environ.get(
        "RETRAINER_TEST_POSTGRES_URL", "postgresql+psycopg://retrainer:retrainer@127.0.0.1:5432/retrainer_test"
    ),
)


def sqlite_database(directory: Path) -> str:
    import migrations

    url = f"sqlite:///{directory / 'bench.db'}"
    migrations.upgrade(url)
    return url


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """The URL of a fresh, migrated database `<prefix>_<random>` on the benchmark's server."""
    import migrations
    from storage.db import create_db_engine

    server = make_url(POSTGRES_URL)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_db_engine(server.render_as_string(hide_password=False))
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = server.set(database=name).render_as_string(hide_password=False)
        migrations.upgrade(url)
        yield url
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
