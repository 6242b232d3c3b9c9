"""Revision 0008 widens runs.status and model_versions.stage for awaiting_approval: on SQLite it copies
both tables, which must not fire the ON DELETE actions of the rows that point at them; its downgrade
rejects the runs still waiting (fail closed) before narrowing the columns again."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.orm import Session

import migrations
from domain import entities as e
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.storage.test_migrations import empty_database_url  # noqa: F401 - the fixture, on both backends

T = TypeVar("T")
PIPELINE = "digits"


def in_transaction(url: str, work: Callable[[Session], T]) -> T:
    engine = create_db_engine(url)
    try:
        with transaction(make_sessions(engine)) as session:
            return work(session)
    finally:
        engine.dispose()  # no connection of ours stays open while a revision copies or alters tables


def test_0008_keeps_every_link_and_its_downgrade_rejects_waiting_runs(empty_database_url: str) -> None:  # noqa: F811
    url = empty_database_url
    migrations.upgrade(url)  # today's repositories write the decision outbox (0009): seed at the head,

    def promoted_run(session: Session) -> tuple[str, int]:
        repo.upsert_pipeline(session, PIPELINE, PIPELINE, {"name": PIPELINE})
        run, _ = repo.create_run(session, PIPELINE, e.TriggerKind.MANUAL)
        version = repo.register_model_version(
            session, PIPELINE, artifact_uri="file:///m/1", sha256="a" * 64, size_bytes=1, metrics={}, run_id=run.id
        )
        repo.move_champion(
            session, PIPELINE, version.id, expected_from_version_id=None, actor="gate", reason="ok", run_id=run.id
        )
        return run.id, version.id

    run_id, version_id = in_transaction(url, promoted_run)
    migrations.downgrade(url, "0007")  # then go below 0008 with the rows in place and copy them up again
    migrations.upgrade(url)

    def wait(session: Session) -> None:
        assert repo.get_model_version_by_id(session, version_id).run_id == run_id  # not set to NULL
        assert [move.run_id for move in repo.alias_moves_of_run(session, run_id)] == [run_id]
        repo.update_run(session, run_id, status=e.RunStatus.AWAITING_APPROVAL)
        repo.set_model_stage(session, version_id, e.ModelStage.AWAITING_APPROVAL)

    in_transaction(url, wait)
    migrations.downgrade(url, "0007")

    def after_downgrade(session: Session) -> tuple[e.Run, e.ModelVersion]:
        return repo.get_run(session, run_id), repo.get_model_version_by_id(session, version_id)

    run, version = in_transaction(url, after_downgrade)
    assert run.status is e.RunStatus.REJECTED and run.finished_at is not None
    assert run.error is not None and "below revision 0008" in run.error
    assert version.stage is e.ModelStage.REJECTED and version.run_id == run_id
