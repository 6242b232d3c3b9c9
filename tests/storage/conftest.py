"""One parametrized fixture runs every storage test on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

import migrations
from storage.db import create_db_engine, make_sessions
from storage.orm import Base

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


def wipe(engine: Engine) -> None:
    """Empties every table between tests (much faster than re-migrating)."""
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            conn.execute(text("PRAGMA foreign_keys=OFF"))
            for table in tables:
                conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608 - table names from our metadata
            conn.execute(text("PRAGMA foreign_keys=ON"))


@pytest.fixture(scope="session")
def _sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('db')) / 'retrainer.db'}"
    migrations.upgrade(url)
    engine = create_db_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def _postgresql_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("postgres_url")
    migrations.upgrade(url)  # `make test` already did; this makes a bare pytest run work too
    engine = create_db_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    engine: Engine = request.getfixturevalue(f"_{request.param}_engine")
    wipe(engine)
    yield engine


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessions(engine)
