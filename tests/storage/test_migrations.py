"""The migrated schema is exactly the ORM's, on both backends, and migrations run both ways."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url

import migrations
from storage.db import create_db_engine
from storage.orm import Base

EXPECTED_TABLES = {
    "pipelines",
    "dataset_versions",
    "events",
    "run_events",
    "runs",
    "model_versions",
    "gate_decisions",
    "rollouts",
    "rollout_steps",
    "alias_history",
    "api_keys",
}


def test_migrated_schema_has_no_drift_from_the_orm(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
        assert diff == [], f"storage/orm.py and migrations/ differ; add a revision: {diff}"
        assert context.get_current_revision() is not None


def test_orm_has_every_contract_table() -> None:
    assert set(Base.metadata.tables) >= EXPECTED_TABLES


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    base_url = make_url(request.getfixturevalue("postgres_url"))
    name = f"retrainer_mig_{uuid.uuid4().hex[:8]}"
    admin = create_db_engine(base_url.render_as_string(hide_password=False))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_upgrade_downgrade_upgrade_roundtrip(empty_database_url: str) -> None:
    def tables() -> set[str]:
        engine = create_db_engine(empty_database_url)
        try:
            with engine.connect() as conn:
                return set(inspect(conn).get_table_names()) - {"alembic_version"}
        finally:
            engine.dispose()

    migrations.upgrade(empty_database_url)
    assert tables() == EXPECTED_TABLES
    migrations.downgrade(empty_database_url, "base")
    assert tables() == set()
    migrations.upgrade(empty_database_url)
    assert tables() == EXPECTED_TABLES
