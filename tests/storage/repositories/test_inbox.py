"""The inbox: each event id stored once, one by one or in batches and under races (SQLite, PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from storage import repositories as repo
from tests.storage.repositories.conftest import new_event, race, store_event, tx


def test_inbox_stores_each_event_id_once(sessions: sessionmaker[Session]) -> None:
    event, created = tx(sessions, lambda s: store_event(s, "evt-1", offset=5))
    assert created and event.status is e.EventStatus.RECEIVED and (event.partition, event.offset) == (1, 5)
    again, created_again = tx(sessions, lambda s: store_event(s, "evt-1", offset=9))
    assert not created_again and again.id == event.id and again.offset == 5
    assert [ev.event_id for ev in tx(sessions, lambda s: repo.pending_events(s, "digits"))] == ["evt-1"]


def test_inbox_concurrent_redelivery_has_one_effect(sessions: sessionmaker[Session]) -> None:
    results = race(8, lambda i: tx(sessions, lambda s: store_event(s, "evt-race", offset=i)))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(created for _, created in results) == 1
    assert len({event.id for event, _ in results}) == 1


def test_batch_inbox_insert_counts_new_and_redelivered(sessions: sessionmaker[Session]) -> None:
    tx(sessions, lambda s: store_event(s, "b-0"))
    stored, duplicates = tx(
        sessions,
        lambda s: repo.add_many_to_inbox(s, [new_event("b-0"), new_event("b-1"), new_event("b-2"), new_event("b-1")]),
    )
    assert (stored, duplicates) == (2, 2)
    assert {ev.event_id for ev in tx(sessions, lambda s: repo.pending_events(s, "digits"))} == {"b-0", "b-1", "b-2"}


def test_racing_batch_inserts_store_each_event_once(sessions: sessionmaker[Session]) -> None:
    batches = [[new_event(f"r-{j}") for j in range(i * 10, i * 10 + 30)] for i in range(4)]  # overlapping ids
    results = race(4, lambda i: tx(sessions, lambda s: repo.add_many_to_inbox(s, batches[i])))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(stored for stored, _ in results) == 60
    assert len(tx(sessions, lambda s: repo.pending_events(s, "digits"))) == 60


def test_an_event_keeps_every_field_it_was_received_with(sessions: sessionmaker[Session]) -> None:
    single, _ = tx(sessions, lambda s: repo.add_to_inbox(s, subject="digits", **_fields("one")))
    tx(sessions, lambda s: repo.add_many_to_inbox(s, [repo.NewInboxEvent(subject="digits", **_fields("two"))]))
    batched = tx(sessions, lambda s: repo.get_event(s, "two"))
    for event, event_id in ((single, "one"), (batched, "two")):
        assert {name: getattr(event, name) for name in _fields(event_id)} == _fields(event_id)
        assert event.subject == "digits" and event.status is e.EventStatus.RECEIVED
        assert event.received_at.utcoffset() == timedelta(0)


def _fields(event_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "source": "//warehouse/etl",
        "type": "retrainer.data.changed",
        "dataset": "digits",
        "payload": {"dataset": "digits", "uri": f"s3://d/{event_id}.csv"},
        "topic": "retrainer.data-changes",
        "partition": 2,
        "offset": 11,
    }
