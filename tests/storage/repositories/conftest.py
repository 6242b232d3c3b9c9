"""Helpers for the repository tests; the `sessions` fixture (SQLite and PostgreSQL) is in
tests/storage/conftest.py."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from storage import repositories as repo
from storage.db import transaction

T = TypeVar("T")
SPEC = {"name": "digits-classifier", "dataset": "digits", "model": {"architecture": "mlp"}}
SHA_A = "a" * 64
SHA_B = "b" * 64


def tx(sessions: sessionmaker[Session], fn: Callable[[Session], T]) -> T:
    with transaction(sessions) as session:
        return fn(session)


@pytest.fixture
def pipeline(sessions: sessionmaker[Session]) -> e.Pipeline:
    return tx(sessions, lambda s: repo.upsert_pipeline(s, "digits-classifier", "digits", SPEC))


def race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Runs fn(i) in n threads released together; returns results or raised exceptions."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # collected and asserted by the caller
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def register(sessions: sessionmaker[Session], sha: str = SHA_A, run_id: str | None = None) -> e.ModelVersion:
    return tx(
        sessions,
        lambda s: repo.register_model_version(
            s,
            "digits-classifier",
            artifact_uri=f"file:///m/{sha[:4]}.pt",
            sha256=sha,
            size_bytes=10,
            metrics={"accuracy": 0.91},
            run_id=run_id,
        ),
    )


def store_event(session: Session, event_id: str, offset: int = 0) -> tuple[e.InboxEvent, bool]:
    return repo.add_to_inbox(
        session,
        event_id=event_id,
        source="//warehouse/etl",
        type="retrainer.data.changed",
        dataset="digits",
        payload={"dataset": "digits", "uri": "s3://d/v1.csv"},
        topic="retrainer.data-changes",
        partition=1,
        offset=offset,
    )


def new_event(event_id: str) -> repo.NewInboxEvent:
    return repo.NewInboxEvent(
        event_id=event_id,
        source="//t",
        type="retrainer.data.changed",
        dataset="digits",
        payload={"data": {"dataset": "digits", "uri": "s3://d/x.csv"}},
        topic="t",
        partition=0,
        offset=1,
    )
