"""The migrated schema is exactly the ORM's, on both backends, and migrations run both ways."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url

import migrations
from domain.entities import RolloutStatus, Verdict
from domain.evidence import CanaryAction, StepAnalysis, VariantWindow
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
    "serving_replicas",
    "replica_windows",
    "outbox",
    "webhook_deliveries",
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


# ------------------------------------------------------------- 0003: typed canary attempts

STARTED = datetime(2026, 11, 23, 10, 0, 0)
OLD_WINDOW = {  # what the controller stored per variant before 0003 (no "rejected")
    "version": "2",
    "requests": 250,
    "errors": 1,
    "latency_p50_ms": 1.2,
    "latency_p99_ms": 3.4,
    "class_counts": {"0": 125, "1": 125},
    "labelled": 0,
    "correct": 0,
}
OLD_CHECK = {  # no "check", "ci_low", "ci_high"
    "metric": "error_rate",
    "verdict": "pass",
    "reason": "0.0040 <= 0.0100",
    "candidate_value": 0.004,
    "champion_value": None,
    "threshold": 0.01,
}
OLD_ATTEMPT = {
    "action": "repeat",
    "reason": "failure 1/2: latency",
    "at": "2026-11-23T10:00:31+00:00",
    "elapsed_seconds": 31.2,
    "traffic_percent": 10.0,
    "canary": OLD_WINDOW,
    "champion": OLD_WINDOW | {"version": "1"},
    "checks": [OLD_CHECK],
    "server_error": "stats endpoint timed out",
}
ODD_ATTEMPT = {  # written by hand: values the typed model cannot take, keys missing
    "action": "rollback",
    "reason": 7,
    "at": "2026-11-23T10:01:00",  # no time zone
    "traffic_percent": 0.0,  # a rollback's share: 0 is a value, not a missing one
    "canary": {"version": 2, "requests": -3, "errors": 1.6, "latency_p99_ms": "slow", "note": "kept"},
    "champion": None,
    "checks": [OLD_CHECK, {"metric": "psi"}, OLD_CHECK | {"threshold": "NaN"}],
    "extra": {"kept": True},
}
OLD_ANALYSES: dict[int, Any] = {
    0: {"attempts": [OLD_ATTEMPT, OLD_ATTEMPT | {"action": "advance"}], "action": "advance", "reason": "passed"},
    1: {"attempts": [OLD_ATTEMPT], "action": "aborted", "reason": "aborted by alice: incident 7"},
    2: {},  # a step recorded without analysis
    3: {"attempts": [{"canary": None, "checks": [1]}, {"action": "rollback", "canary": {"requests": "many"}}]},
    4: {"attempts": []},  # a step opened, not yet analysed
    5: {"attempts": [ODD_ATTEMPT, "garbage"], "action": "exploded", "reason": {"x": 1}, "note": "kept"},
    6: {"attempts": "lost", "note": "kept"},
    7: ["not", "an", "object"],
}


def _insert_old_rollout(url: str) -> None:
    def table(name: str, *columns: str) -> Any:
        return sa.table(name, *(sa.column(c) for c in columns))

    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            when = {"created_at": STARTED, "updated_at": STARTED}
            conn.execute(
                sa.insert(table("pipelines", "id", "name", "dataset", "spec", "spec_sha256", *when)).values(
                    id=1, name="digits", dataset="digits", spec=sa.literal("{}", sa.JSON), spec_sha256="0" * 64, **when
                )
            )
            version = ("id", "pipeline_id", "version", "artifact_uri", "sha256", "size_bytes", "metrics", "stage")
            conn.execute(
                sa.insert(table("model_versions", *version, "created_at", "stage_changed_at")).values(
                    id=1, pipeline_id=1, version=1, artifact_uri="file:///m.pt", sha256="a" * 64, size_bytes=1,
                    metrics=sa.literal("{}", sa.JSON), stage="canary", created_at=STARTED, stage_changed_at=STARTED,
                )
            )  # fmt: skip
            rollout = ("id", "pipeline_id", "candidate_version_id", "status", "current_step", "policy", "started_at")
            conn.execute(
                sa.insert(table("rollouts", *rollout)).values(
                    id=1, pipeline_id=1, candidate_version_id=1, status="aborted", current_step=1,
                    policy=sa.literal({"steps": [10, 50, 100]}, sa.JSON), started_at=STARTED,
                )
            )  # fmt: skip
            steps = table(
                "rollout_steps", "id", "rollout_id", "step_index", "traffic_percent", "analysis", "started_at"
            )
            for index, analysis in OLD_ANALYSES.items():
                conn.execute(
                    sa.insert(steps).values(
                        id=index + 1, rollout_id=1, step_index=index, traffic_percent=10.0 * (index + 1),
                        analysis=sa.literal(analysis, sa.JSON), started_at=STARTED,
                    )
                )  # fmt: skip
    finally:
        engine.dispose()


def _analyses(url: str) -> dict[int, dict[str, Any]]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            steps = sa.table("rollout_steps", sa.column("step_index"), sa.column("analysis", sa.JSON))
            return {
                index: analysis for index, analysis in conn.execute(sa.select(steps.c.step_index, steps.c.analysis))
            }
    finally:
        engine.dispose()


def test_0003_rewrites_stored_canary_attempts_into_the_typed_shape(empty_database_url: str) -> None:
    migrations.upgrade(empty_database_url, "0002")
    _insert_old_rollout(empty_database_url)
    stored = _analyses(empty_database_url)
    migrations.upgrade(empty_database_url, "0003")

    typed = {index: StepAnalysis.model_validate(raw) for index, raw in _analyses(empty_database_url).items()}
    repeated, advanced = typed[0].attempts
    assert (repeated.action, advanced.action, typed[0].action) == (CanaryAction.REPEAT, CanaryAction.ADVANCE, "advance")
    assert typed[0].repeats == 1 and repeated.server_error == "stats endpoint timed out"
    assert repeated.canary == VariantWindow(**OLD_WINDOW) and repeated.champion.version == "1"
    assert repeated.at == datetime(2026, 11, 23, 10, 0, 31, tzinfo=UTC) and repeated.elapsed_seconds == 31.2
    (check,) = repeated.checks
    assert (check.metric, check.check, check.verdict, check.candidate_value) == (
        "error_rate",
        "canary",
        Verdict.PASS,
        0.004,
    )
    assert typed[1].action is RolloutStatus.ABORTED and typed[1].reason == "aborted by alice: incident 7"
    assert typed[2] == typed[4] == StepAnalysis()
    # not an analysed window (no action) is left out; a mistyped count becomes 0; the step's own time and share fill in
    (rollback,) = typed[3].attempts
    assert (rollback.canary.requests, rollback.reason, rollback.traffic_percent) == (0, "", 40.0)
    assert rollback.at == STARTED.replace(tzinfo=UTC) and typed[3].action is CanaryAction.ROLLBACK
    (odd,) = typed[5].attempts
    assert (odd.reason, odd.traffic_percent, odd.at) == ("", 0.0, datetime(2026, 11, 23, 10, 1, tzinfo=UTC))
    assert (odd.canary.version, odd.canary.requests, odd.canary.errors, odd.canary.latency_p99_ms) == ("2", 0, 2, None)
    assert odd.champion == VariantWindow() and [c.threshold for c in odd.checks] == [0.01, None]
    assert (typed[5].action, typed[5].reason) == (CanaryAction.ROLLBACK, None)
    assert typed[6] == typed[7] == StepAnalysis()
    # what could not be carried over is kept, with where it was
    unparsed = _analyses(empty_database_url)
    assert {"at": ["attempts", 0], "entry": {"canary": None, "checks": [1]}} in unparsed[3]["unparsed"]
    assert {"at": ["attempts", 1], "entry": "garbage"} in unparsed[5]["unparsed"]
    assert {"at": ["attempts", 0, "checks", 1], "entry": {"metric": "psi"}} in unparsed[5]["unparsed"]
    assert unparsed[7] == {"unparsed": [{"at": [], "entry": ["not", "an", "object"]}]}
    assert "unparsed" not in unparsed[0] and unparsed[2] == {} and unparsed[4] == {"attempts": []}

    migrations.downgrade(empty_database_url, "0002")
    restored = _analyses(empty_database_url)
    for index in OLD_ANALYSES:  # every shape comes back as revision 0002 stored it
        assert restored[index] == stored[index], index
    migrations.upgrade(empty_database_url)
    assert StepAnalysis.model_validate(_analyses(empty_database_url)[0]).attempts[0] == repeated
