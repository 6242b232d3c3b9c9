"""The decision relay: the loop service (flows/loop.py) that takes decision events out of the outbox.

Each pass, in one transaction per batch: read the oldest unsent events (storage/repositories/outbox.py),
hand them to the sink (Kafka `retrainer.decisions`, consumers/decisions.py) and wait for its
acknowledgement, then mark them sent and add a pending webhook delivery for every webhook of the
event's pipeline that wants it (`notifications.webhooks`; flows/webhooks.py sends them).

At least once: a relay that dies between the broker's ack and the commit sends the same events
again, with the same ids, on its next pass; consumers deduplicate by id. A broker outage fails the
pass (TransientInfraError): the rows stay unsent and the runner retries with its back-off. Without a
sink (Kafka not configured) events go only to webhooks.

Order: events leave in outbox order. Two decisions committed at once may take their outbox positions
in one order and commit in the other, so a pipeline's events are ordered by outbox position, which is
the order in which they were decided except for decisions made concurrently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from domain.decisions import DecisionEvent
from domain.errors import NotFoundError
from domain.notification_spec import NotificationsSpec, WebhookSpec
from storage import repositories as repo
from storage.db import transaction

log = logging.getLogger("retrainer.flows.relay")

DEFAULT_BATCH = 500


class DecisionSink(Protocol):
    def publish(self, events: Sequence[DecisionEvent]) -> None:
        """Returns once every event is acknowledged; raises (TransientInfraError) otherwise."""


class DecisionRelay:
    """`run_once()`: relays every unsent event, a batch per transaction; returns how many it sent."""

    name = "decision-relay"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        sink: DecisionSink | None,
        *,
        batch: int = DEFAULT_BATCH,
        webhooks: Sequence[WebhookSpec] = (),
    ) -> None:
        """`webhooks`: every pipeline's (RETRAINER_WEBHOOKS), besides those its own spec names."""
        self.sessions, self.sink, self.batch, self.webhooks = sessions, sink, batch, tuple(webhooks)

    def run_once(self) -> int:
        sent = 0
        while True:
            with transaction(self.sessions) as session:
                batch = repo.unsent_events(session, self.batch)
                if not batch:
                    return sent
                events = [event for _, event in batch]
                if self.sink is not None:
                    self.sink.publish(events)  # raising rolls back: the rows stay unsent
                hooks: dict[str, list[WebhookSpec]] = {}
                deliveries = [
                    (position, hook.url, hook.secret_env)
                    for position, event in batch
                    for hook in _webhooks(session, event.pipeline, hooks, self.webhooks)
                    if hook.wants(event.type.value)
                ]
                repo.mark_sent(session, [position for position, _ in batch], deliveries)
            sent += len(batch)
            log.info("relayed %d decision events (%d webhook deliveries queued)", len(batch), len(deliveries))
            if len(batch) < self.batch:
                return sent


def _webhooks(
    session: Session, pipeline: str, cache: dict[str, list[WebhookSpec]], every_pipeline: Sequence[WebhookSpec]
) -> list[WebhookSpec]:
    """The pipeline's webhooks as its stored spec names them (none for a pipeline that is gone), then
    `every_pipeline`'s; one per URL (a delivery is unique per event and URL), the spec's first."""
    if pipeline not in cache:
        own: list[WebhookSpec] = []
        try:
            document = repo.get_pipeline(session, pipeline).spec.get("notifications") or {}
            own = NotificationsSpec.model_validate(document).webhooks
        except NotFoundError:
            pass
        except ValidationError as err:  # stored before validation existed: say so, deliver none of its own
            log.error(
                "pipeline %s: the stored spec's notifications are invalid, "
                "none of its own webhooks gets its events: %s",
                pipeline,
                err,
            )
        by_url: dict[str, WebhookSpec] = {}
        for hook in (*own, *every_pipeline):
            by_url.setdefault(hook.url, hook)
        cache[pipeline] = list(by_url.values())
    return cache[pipeline]
