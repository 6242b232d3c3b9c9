"""The decision outbox and its webhook deliveries (domain/decisions.py, flows/relay.py).

`record_decision` is called by the repository function that makes each decision (runs, gates,
rollouts, models), in the caller's transaction: the event exists if and only if the decision does.
The relay reads `unsent_events` in order, publishes them, then `mark_sent` (with the webhook
deliveries each event gets) in one transaction. Two relays never take the same rows at once on
PostgreSQL (FOR UPDATE SKIP LOCKED); SQLite has one writer anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from domain.decisions import DecisionEvent, DeliveryStatus, WebhookDelivery
from domain.errors import InvalidInputError, NotFoundError
from storage.orm import SqlOutboxEvent, SqlWebhookDelivery, utcnow


def record_decision(session: Session, event: DecisionEvent) -> None:
    """Adds the event to the outbox, in the caller's transaction (rolled back with the decision)."""
    same_names = {name: getattr(event, name) for name in ("source", "pipeline", "time", "data")}
    session.add(SqlOutboxEvent(event_id=event.id, type=event.type.value, **same_names))
    session.flush()


def unsent_events(session: Session, limit: int = 500) -> list[tuple[int, DecisionEvent]]:
    """The oldest unsent events with their outbox positions, locked until the caller's transaction ends."""
    if not 1 <= limit <= 10_000:
        raise InvalidInputError(f"limit must be between 1 and 10000 (got {limit})")
    query = (
        select(SqlOutboxEvent)
        .where(SqlOutboxEvent.sent_at.is_(None))
        .order_by(SqlOutboxEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [(row.id, row.to_entity()) for row in session.scalars(query)]


def outbox_events(session: Session, pipeline: str | None = None, *, sent: bool | None = None) -> list[DecisionEvent]:
    """Every event in outbox order (only `pipeline`'s; only sent or unsent ones when `sent` is given)."""
    query = select(SqlOutboxEvent).order_by(SqlOutboxEvent.id)
    if pipeline is not None:
        query = query.where(SqlOutboxEvent.pipeline == pipeline)
    if sent is not None:
        query = query.where(SqlOutboxEvent.sent_at.is_not(None) if sent else SqlOutboxEvent.sent_at.is_(None))
    return [row.to_entity() for row in session.scalars(query)]


def mark_sent(
    session: Session,
    positions: Sequence[int],
    deliveries: Sequence[tuple[int, str, str]] = (),
    now: datetime | None = None,
) -> None:
    """Marks the outbox rows sent and adds the webhook deliveries (outbox position, url, secret_env) they need."""
    if positions:
        session.execute(
            update(SqlOutboxEvent)
            .where(SqlOutboxEvent.id.in_(list(positions)))
            .values(sent_at=now or utcnow())
            .execution_options(synchronize_session=False)
        )
    for position, url, secret_env in deliveries:
        session.add(
            SqlWebhookDelivery(
                outbox_id=position, url=url, secret_env=secret_env, status=DeliveryStatus.PENDING.value, attempts=0
            )
        )
    session.flush()


def webhook_deliveries(
    session: Session, status: DeliveryStatus | None = None, limit: int = 100, *, newest_first: bool = False
) -> list[WebhookDelivery]:
    """Deliveries oldest first, or newest first (only those with `status` if given): pending ones to
    send, the most recent failed ones to show."""
    order = SqlWebhookDelivery.id.desc() if newest_first else SqlWebhookDelivery.id
    query = select(SqlWebhookDelivery).order_by(order).limit(limit)
    if status is not None:
        query = query.where(SqlWebhookDelivery.status == status.value)
    return [row.to_entity() for row in session.scalars(query)]


def finish_delivery(
    session: Session,
    delivery_id: int,
    *,
    delivered: bool,
    attempts: int,
    response_status: int | None = None,
    error: str | None = None,
) -> WebhookDelivery:
    """Records a delivery's end: delivered, or failed after its last try (with the last error)."""
    row = session.get(SqlWebhookDelivery, delivery_id)
    if row is None:
        raise NotFoundError(f"webhook delivery {delivery_id} not found")
    row.status = (DeliveryStatus.DELIVERED if delivered else DeliveryStatus.FAILED).value
    row.attempts, row.response_status, row.error, row.finished_at = attempts, response_status, error, utcnow()
    session.flush()
    return row.to_entity()
