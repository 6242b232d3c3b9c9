"""A promotion is pushed to the model server's follower (serving/loader.py, storage/notify.py):
with a refresh interval of 5 s, a champion moved in this process (SQLite and PostgreSQL) or by
another PostgreSQL client (UPDATE + NOTIFY, what `move_champion` sends) is served within a second,
and a canary's weight step too. Behavioural bounds, not a benchmark (bench/promotion.py measures)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from domain.settings import load_settings
from serving.loader import MetadataFollower
from serving.registry import ModelRegistry
from storage import repositories as repo
from storage.artifacts import ArtifactStore, open_artifact_store
from storage.db import create_db_engine, make_sessions, transaction
from storage.notify import SERVING_CHANNEL
from tests.flows.test_trigger_service import _own_postgresql  # noqa: F401
from tests.serving.test_loader import _promote, _register
from tests.storage.conftest import wipe

REFRESH_S = 5.0


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        sqlite_url = f"sqlite:///{tmp_path / 'retrainer.db'}"
        migrations.upgrade(sqlite_url)
        return sqlite_url
    postgresql_url: str = request.getfixturevalue("_own_postgresql")
    return postgresql_url


@pytest.fixture
def metadata(database_url: str, tmp_path: Path) -> Iterator[tuple[sessionmaker[Session], ArtifactStore]]:
    engine = create_db_engine(database_url)
    wipe(engine)
    sessions = make_sessions(engine)
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, "digits", "digits", {"name": "digits"})
    yield sessions, open_artifact_store(f"file://{tmp_path / 'artifacts'}", load_settings())
    engine.dispose()


@contextmanager
def following(sessions: sessionmaker[Session], store: ArtifactStore) -> Iterator[MetadataFollower]:
    follower = MetadataFollower(ModelRegistry(), sessions, store)
    follower.sync()
    follower.start(REFRESH_S)
    try:
        time.sleep(0.5)  # the listener is connected and the pass its connection woke is over
        yield follower
    finally:
        follower.stop()
        follower.registry.close()


def seconds_until(condition: Callable[[], bool], timeout_s: float) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout_s:
            raise AssertionError(f"not served within {timeout_s} s")
        time.sleep(0.005)
    return time.perf_counter() - started


def serves(follower: MetadataFollower, version_id: int) -> Callable[[], bool]:
    def check() -> bool:
        champion = follower.registry.state("digits").champion
        return champion is not None and champion.version_id == version_id

    return check


def test_a_champion_moved_in_this_process_is_served_before_the_refresh(
    metadata: tuple[sessionmaker[Session], ArtifactStore], tmp_path: Path
) -> None:
    sessions, store = metadata
    first, second = (_register(sessions, store, tmp_path, seed) for seed in (1, 2))
    _promote(sessions, first)
    with following(sessions, store) as follower:
        assert serves(follower, first.id)()
        _promote(sessions, second)
        assert seconds_until(serves(follower, second.id), REFRESH_S) < 1.0
        with transaction(sessions) as session:
            rollout = repo.start_rollout(
                session, "digits", candidate_version_id=first.id, champion_version_id=second.id,
                policy={"steps": [10, 50, 100]},
            )  # fmt: skip
        assert seconds_until(lambda: follower.registry.state("digits").canary_weight == 10, REFRESH_S) < 1.0
        with transaction(sessions) as session:
            repo.record_rollout_step(session, rollout.id, step_index=0, traffic_percent=10, verdict=e.Verdict.PASS)
        assert seconds_until(lambda: follower.registry.state("digits").canary_weight == 50, REFRESH_S) < 1.0


@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.integration)], indirect=True)
def test_a_champion_moved_by_another_postgresql_client_is_served_before_the_refresh(
    metadata: tuple[sessionmaker[Session], ArtifactStore], tmp_path: Path
) -> None:
    sessions, store = metadata
    engine = sessions.kw["bind"]
    first = _register(sessions, store, tmp_path, 1)
    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with following(sessions, store) as follower, psycopg.connect(conninfo) as other:
        with other.transaction():  # nothing in this process hears this commit: only LISTEN can
            other.execute("UPDATE pipelines SET champion_version_id = %s WHERE name = 'digits'", (first.id,))
            other.execute("SELECT pg_notify(%s, 'digits')", (SERVING_CHANNEL,))
        assert seconds_until(serves(follower, first.id), REFRESH_S) < 1.0
