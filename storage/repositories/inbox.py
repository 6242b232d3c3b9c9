"""The inbox: each received CloudEvent stored once per id, before its Kafka offset is committed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain import entities as e
from domain.errors import NotFoundError
from storage.orm import SqlEvent, utcnow


@dataclass(frozen=True, slots=True)
class NewInboxEvent:
    """An event as received, before the inbox gives it a row id and a status."""

    event_id: str
    source: str
    type: str
    dataset: str
    payload: dict[str, Any]
    subject: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


def _columns(event: NewInboxEvent) -> dict[str, Any]:
    # Shallow: `asdict` deep-copies each payload, a third of the consumer's CPU (bench/triggers.py).
    columns = {field.name: getattr(event, field.name) for field in fields(event)}
    return {**columns, "status": e.EventStatus.RECEIVED.value, "received_at": utcnow()}


def add_to_inbox(
    session: Session,
    *,
    event_id: str,
    source: str,
    type: str,
    dataset: str,
    payload: dict[str, Any],
    subject: str | None = None,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
) -> tuple[e.InboxEvent, bool]:
    """Stores an event once per id. Returns (event, created); a redelivery returns created=False
    and the first delivery's row, so the same id has the effect of once."""
    event = NewInboxEvent(event_id, source, type, dataset, payload, subject, topic, partition, offset)
    return _add_one(session, event)


def _add_one(session: Session, event: NewInboxEvent) -> tuple[e.InboxEvent, bool]:
    query = select(SqlEvent).where(SqlEvent.event_id == event.event_id)
    existing = session.scalars(query).one_or_none()
    if existing is not None:
        return existing.to_entity(), False
    try:
        with session.begin_nested():
            row = SqlEvent(**_columns(event))
            session.add(row)
    except IntegrityError:  # another consumer stored it between our SELECT and INSERT
        return session.scalars(query).one().to_entity(), False
    return row.to_entity(), True


def add_many_to_inbox(session: Session, events: Sequence[NewInboxEvent]) -> tuple[int, int]:
    """Stores a batch of events, each id once: (stored, duplicates). One query finds the ids
    already present and one multi-row insert stores the rest; if a concurrent consumer inserted
    some of them in between, the batch falls back to the row-by-row path, which resolves it."""
    if not events:
        return 0, 0
    ids = [event.event_id for event in events]
    present = set(session.scalars(select(SqlEvent.event_id).where(SqlEvent.event_id.in_(ids))))
    fresh: dict[str, NewInboxEvent] = {}
    for event in events:
        if event.event_id not in present and event.event_id not in fresh:
            fresh[event.event_id] = event
    if fresh:
        try:
            with session.begin_nested():
                session.execute(insert(SqlEvent), [_columns(event) for event in fresh.values()])
        except IntegrityError:
            stored = sum(_add_one(session, event)[1] for event in fresh.values())
            return stored, len(events) - stored
    return len(fresh), len(events) - len(fresh)


def get_event(session: Session, event_id: str) -> e.InboxEvent:
    row = session.scalars(select(SqlEvent).where(SqlEvent.event_id == event_id)).one_or_none()
    if row is None:
        raise NotFoundError(f"event {event_id!r} not found in the inbox")
    return row.to_entity()


def pending_events(session: Session, dataset: str) -> list[e.InboxEvent]:
    query = (
        select(SqlEvent)
        .where(SqlEvent.dataset == dataset, SqlEvent.status == e.EventStatus.RECEIVED.value)
        .order_by(SqlEvent.id)
    )
    return [row.to_entity() for row in session.scalars(query)]


def set_event_status(session: Session, event_ids: Iterable[str], status: e.EventStatus) -> int:
    ids = list(event_ids)
    if not ids:
        return 0
    result = session.execute(update(SqlEvent).where(SqlEvent.event_id.in_(ids)).values(status=status.value))
    return int(result.rowcount)  # type: ignore[attr-defined]
