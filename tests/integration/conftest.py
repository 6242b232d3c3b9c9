"""Fixtures the whole-service stories share."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url


@pytest.fixture
def e2e_database(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of the test's own (created empty, dropped after), for `retrainer serve`."""
    name = f"retrainer_e2e_{uuid.uuid4().hex[:8]}"
    url = make_url(postgres_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield url.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
