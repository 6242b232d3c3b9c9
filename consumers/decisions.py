"""The Kafka side of the decision relay (flows/relay.py): decision events onto `retrainer.decisions`.

Each record is the event in the CloudEvents Kafka binding's structured mode (content-type
`application/cloudevents+json`, the value is `DecisionEvent.body()`, which `consumers/binding.py`
reads back), keyed by pipeline so one pipeline's decisions stay in order in one partition.
`publish` returns only after the broker acknowledged every record (acks=all, an idempotent
producer); anything less raises `TransientInfraError` and the relay keeps the rows for its next pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from kafka import KafkaProducer
from kafka.errors import KafkaError

from domain.decisions import CONTENT_TYPE, DecisionEvent
from domain.errors import TransientInfraError


class KafkaDecisionSink:
    """Publishes decision events to `topic`; one producer, reopened after a failure."""

    def __init__(self, bootstrap_servers: str, topic: str, *, timeout_s: float = 10.0) -> None:
        self.bootstrap_servers, self.topic, self.timeout_s = bootstrap_servers, topic, timeout_s
        self._producer: KafkaProducer | None = None

    def _open(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(
                bootstrap_servers=self.bootstrap_servers.split(","),
                acks="all",
                enable_idempotence=True,  # a retried send is written once, in order
                # every wait bounded by the timeout: an outage fails the pass, the runner retries it
                bootstrap_timeout_ms=int(self.timeout_s * 1000),
                max_block_ms=int(self.timeout_s * 1000),
                request_timeout_ms=int(self.timeout_s * 1000),
                delivery_timeout_ms=int(self.timeout_s * 2000),
            )
        return self._producer

    def publish(self, events: Sequence[DecisionEvent]) -> None:
        headers = [("content-type", CONTENT_TYPE.encode())]
        try:
            producer = self._open()
            futures = [
                producer.send(self.topic, key=event.pipeline.encode(), value=event.body(), headers=headers)
                for event in events
            ]
            producer.flush(self.timeout_s)
            for future in futures:
                future.get(timeout=self.timeout_s)
        except KafkaError as e:
            self.close()  # a fresh producer reconnects from scratch on the next pass
            raise TransientInfraError(
                f"publishing {len(events)} decision events to {self.topic} on {self.bootstrap_servers} failed ({e}); "
                "they stay in the outbox and are sent on a later pass"
            ) from e

    def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            # closing a producer whose broker is gone: nothing is left to save
            with contextlib.suppress(KafkaError):
                producer.close(timeout=self.timeout_s)
