"""Pipelines: registration, lookup, freeze windows, on SQLite and PostgreSQL (the `sessions` fixture)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import NotFoundError
from storage import repositories as repo
from tests.storage.repositories.conftest import SPEC, tx


def test_pipeline_upsert_and_lookup(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    assert pipeline.name == "digits-classifier" and pipeline.champion_version_id is None
    assert pipeline.created_at.tzinfo is not None
    updated = tx(sessions, lambda s: repo.upsert_pipeline(s, "digits-classifier", "digits", {**SPEC, "x": 1}))
    assert updated.id == pipeline.id and updated.spec_sha256 != pipeline.spec_sha256
    assert [p.name for p in tx(sessions, repo.list_pipelines)] == ["digits-classifier"]
    assert [p.name for p in tx(sessions, lambda s: repo.pipelines_for_dataset(s, "digits"))] == ["digits-classifier"]


def test_unknown_pipeline_names_the_known_ones(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    with pytest.raises(NotFoundError) as info:
        tx(sessions, lambda s: repo.get_pipeline(s, "nope"))
    assert info.value.code == "not_found"
    assert "'nope'" in str(info.value) and "digits-classifier" in str(info.value)


def test_freeze_window_roundtrips_as_aware_utc(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    until = datetime(2030, 1, 1, 12, tzinfo=UTC)
    frozen = tx(sessions, lambda s: repo.set_freeze(s, "digits-classifier", until))
    assert frozen.frozen_until == until
    assert tx(sessions, lambda s: repo.get_pipeline(s, "digits-classifier")).frozen_until == until


def test_timestamps_are_aware_utc(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    stored = tx(sessions, lambda s: repo.get_run(s, run.id))
    assert stored.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stored.created_at) < timedelta(minutes=1)
