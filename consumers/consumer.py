"""The data-change consumer: Kafka → inbox, with an exactly-once effect.

Per poll batch: every record is parsed; invalid ones go to the dead-letter topic with the
contract's headers; valid ones are inserted into the inbox (unique on the event id) in ONE
transaction; the DLQ sends are flushed (acks=all); only then are the offsets committed. A crash
anywhere before the commit redelivers the batch, and the inbox turns the redelivery into a no-op:
nothing lost, nothing doubled. One bad record never blocks its partition (it is dead-lettered and
passed). Run creation is not done here (the debouncer does it), so a batch stays short and
`max_poll_interval_ms` is never at risk.

The consumer is a loop service (`flows/loop.py`): `run_forever` runs `run_once` until stopped.
SIGTERM/SIGINT: the current batch finishes and commits, then the consumer leaves the group.
The Kafka clients connect in the first pass, so a broker that is down at start is a failed pass
like any other. A broker restart is ridden out by kafka-python's reconnects; any error after a
poll (the database, the dead-letter topic, the commit) rewinds the batch (seek to its first
offsets) and the runner retries it after a back-off, so no later commit can skip it.

Health (`probe`, on /healthz): failing, naming the topic, while the topic does not exist or no
partition of it has been assigned for longer than the session timeout; naming the bootstrap
servers while no broker connection has been up for that long; or while the last batch failed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from consumers.binding import parse_data_change
from consumers.metrics import (
    CONSUMER_LAG,
    EVENTS_CONSUMED,
    EVENTS_DEAD_LETTERED,
    EVENTS_DUPLICATE,
    EVENTS_INVALID,
    PARTITIONS_ASSIGNED,
)
from domain.errors import ConfigurationError, TransientInfraError
from domain.events import DEFAULT_MAX_BYTES, DataChange, InvalidEvent
from domain.settings import Settings
from flows.loop import LoopHealth, run_loop, stop_on_signals
from flows.tracing import ConsumeSpans
from storage import repositories as repo
from storage.db import transaction
from storage.notify import INBOX_CHANNEL, notify
from storage.orm import SqlPipeline

log = logging.getLogger("retrainer.consumers")


@dataclass(frozen=True, slots=True)
class BatchResult:
    records: int
    stored: int
    duplicates: int
    dead_lettered: int


SESSION_TIMEOUT_MS = 10_000
# How long the first connection may take before the pass fails (kafka-python's default is 30 s,
# during which a process would report nothing).
BOOTSTRAP_TIMEOUT_MS = 10_000


def broker_connected(consumer: KafkaConsumer) -> bool:
    """Whether the client holds at least one live broker connection.

    kafka-python 3.0 keeps the assignment through an outage and its polls just return nothing, and
    its public `bootstrap_connected()` only says whether a bootstrap is in progress; the
    connection manager is the one place that knows, hence the private attributes.
    """
    connections = consumer._client._manager._conns  # see the docstring
    return any(connection.connected for connection in list(connections.values()))


class DataChangeConsumer:
    name = "kafka-consumer"

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        max_records: int = 500,
        poll_timeout_ms: int = 500,
        max_event_bytes: int = DEFAULT_MAX_BYTES,
        known_datasets_ttl_s: float = 5.0,
        client_id: str = "retrainer-consumer",
        bootstrap_timeout_ms: int = BOOTSTRAP_TIMEOUT_MS,
    ) -> None:
        self.settings, self.sessions = settings, sessions
        self.topic, self.dlq_topic = settings.kafka_topic, settings.kafka_dlq_topic
        self.max_records, self.poll_timeout_ms, self.max_event_bytes = max_records, poll_timeout_ms, max_event_bytes
        self.client_id, self.bootstrap_timeout_ms = client_id, bootstrap_timeout_ms
        self.stop_requested = threading.Event()
        self._clients: tuple[KafkaConsumer, KafkaProducer] | None = None
        self._known: set[str] = set()
        self._known_at = 0.0
        self._known_ttl = known_datasets_ttl_s
        self.health = LoopHealth(self.name)
        self._unassigned_since: float | None = time.monotonic()
        self._disconnected_since: float | None = None

    # -- the Kafka clients, connected on first use -----------------------------------------------
    def connect(self) -> None:
        """Connects the consumer (joining the group) and the dead-letter producer, if not yet done;
        TransientInfraError naming the bootstrap servers when no broker answers."""
        if self._clients is not None:
            return
        servers = self.settings.kafka_bootstrap_servers
        common = {"bootstrap_servers": servers.split(","), "bootstrap_timeout_ms": self.bootstrap_timeout_ms}
        try:
            consumer = KafkaConsumer(
                self.topic,
                group_id=self.settings.kafka_consumer_group,
                client_id=self.client_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=self.max_records,
                max_poll_interval_ms=300_000,
                session_timeout_ms=SESSION_TIMEOUT_MS,
                heartbeat_interval_ms=3_000,
                **common,
            )
        except KafkaError as err:
            raise self._unreachable(
                f"no broker answered within {self.bootstrap_timeout_ms / 1000:.0f} s ({err})"
            ) from err
        try:
            producer = KafkaProducer(acks="all", linger_ms=5, client_id=f"{self.client_id}-dlq", **common)
        except KafkaError as err:
            consumer.close()
            raise self._unreachable(f"the dead-letter producer could not connect ({err})") from err
        self._clients = (consumer, producer)
        self._unassigned_since = time.monotonic()

    def _unreachable(self, what: str) -> TransientInfraError:
        return TransientInfraError(
            f"Kafka at {self.settings.kafka_bootstrap_servers}: {what}; start the broker (`make services`) "
            "or set RETRAINER_KAFKA_BOOTSTRAP_SERVERS"
        )

    @property
    def consumer(self) -> KafkaConsumer:
        self.connect()
        assert self._clients is not None  # connect() raises otherwise
        return self._clients[0]

    @property
    def producer(self) -> KafkaProducer:
        self.connect()
        assert self._clients is not None
        return self._clients[1]

    # -- datasets the service knows (an unknown dataset is dead-lettered) --------------------
    def known_datasets(self) -> set[str]:
        if time.monotonic() - self._known_at > self._known_ttl:
            with transaction(self.sessions) as session:
                self._known = set(session.scalars(select(SqlPipeline.dataset)))
            self._known_at = time.monotonic()
        return self._known

    # -- one batch ------------------------------------------------------------------------------
    def run_once(self) -> BatchResult:
        batches = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
        try:
            result = self._handle(batches)
        except BaseException:
            self._rewind(batches)  # nothing of it is committed: the next poll delivers it again
            raise
        self._update_lag()
        if not result.records:
            self._check_broker()
            self._check_assignment()
        return result

    def _handle(self, batches: dict[TopicPartition, list[Any]]) -> BatchResult:
        """Stores, dead-letters and commits one polled batch."""
        records = [record for partition_records in batches.values() for record in partition_records]
        if not records:
            return BatchResult(0, 0, 0, 0)
        self._disconnected_since = None  # records came: a broker answers
        EVENTS_CONSUMED.labels(self.topic).inc(len(records))
        valid: list[tuple[Any, DataChange]] = []
        dead = 0
        known = self.known_datasets()
        with ConsumeSpans() as spans:  # a trace per event, ended once the batch is committed
            for record in records:
                try:
                    event = parse_data_change(record.value, record.headers, max_bytes=self.max_event_bytes)
                    if event.dataset not in known:
                        listed = ", ".join(sorted(known)) or "none"
                        raise InvalidEvent(
                            "unknown_dataset", f"no pipeline listens to dataset {event.dataset!r} (known: {listed})"
                        )
                    valid.append((record, spans.add(event, topic=record.topic, offset=record.offset)))
                except InvalidEvent as invalid:
                    self._dead_letter(record, invalid)
                    dead += 1
            stored, duplicates = self._store(valid)
            self.producer.flush(timeout=30)  # the DLQ copies are durable before the offsets move
            self.consumer.commit()
        return BatchResult(len(records), stored, duplicates, dead)

    def _store(self, valid: list[tuple[Any, DataChange]]) -> tuple[int, int]:
        if not valid:
            return 0, 0
        batch = [
            repo.NewInboxEvent(
                event_id=event.event_id,
                source=event.source,
                type=event.type,
                subject=event.subject,
                dataset=event.dataset,
                payload=event.cloudevent,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
            for record, event in valid
        ]
        with transaction(self.sessions) as session:
            stored, duplicates = repo.add_many_to_inbox(session, batch)
            if stored:  # the trigger service wakes once these rows are committed, not at its next poll
                notify(session, INBOX_CHANNEL)
        if duplicates:
            EVENTS_DUPLICATE.inc(duplicates)
            log.info("%d redelivered event(s) were already in the inbox", duplicates)
        return stored, duplicates

    def _dead_letter(self, record: Any, invalid: InvalidEvent) -> None:
        EVENTS_INVALID.labels(invalid.reason).inc()
        EVENTS_DEAD_LETTERED.inc()
        log.warning("dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, invalid.message)
        headers = [
            *(record.headers or []),
            ("retrainer-error", f"{invalid.reason}: {invalid.message}".encode()[:1000]),
            ("retrainer-original-topic", record.topic.encode()),
            ("retrainer-original-partition", str(record.partition).encode()),
            ("retrainer-original-offset", str(record.offset).encode()),
        ]
        self.producer.send(self.dlq_topic, key=record.key, value=record.value, headers=headers)

    def _rewind(self, batches: dict[TopicPartition, list[Any]]) -> None:
        assigned = self.consumer.assignment()
        for partition, partition_records in batches.items():
            # a partition revoked meanwhile is resumed by its new owner from the committed offset
            if partition_records and partition in assigned:
                self.consumer.seek(partition, partition_records[0].offset)

    def _check_broker(self) -> None:
        """Raises, naming the bootstrap servers, once no broker connection has been up for a
        session timeout (shorter gaps are kafka-python reconnecting)."""
        if broker_connected(self.consumer):
            self._disconnected_since = None
            return
        now = time.monotonic()
        self._disconnected_since = self._disconnected_since or now
        waited = now - self._disconnected_since
        if waited * 1000 >= SESSION_TIMEOUT_MS:
            raise self._unreachable(f"no broker connection for {waited:.0f} s")

    def _update_lag(self) -> None:
        for partition in self.consumer.assignment():
            high = self.consumer.highwater(partition)
            position = self.consumer.position(partition) if high is not None else None
            if high is not None and position is not None:
                CONSUMER_LAG.labels(partition.topic, str(partition.partition)).set(max(0, high - position))

    def _check_assignment(self) -> None:
        """Raises, naming the topic, once no partition has been assigned for a session timeout."""
        assigned = len(self.consumer.assignment())
        PARTITIONS_ASSIGNED.labels(self.topic).set(assigned)
        if assigned:
            self._unassigned_since = None
            return
        now = time.monotonic()
        self._unassigned_since = self._unassigned_since or now
        waited = now - self._unassigned_since
        if waited * 1000 < SESSION_TIMEOUT_MS:
            return
        servers = self.settings.kafka_bootstrap_servers
        if not self.consumer.partitions_for_topic(self.topic):  # None or empty: the broker has no such topic
            raise ConfigurationError(
                f"topic {self.topic!r} does not exist on {servers}; create it (`make services` creates the "
                "contract's topics) or set RETRAINER_KAFKA_TOPIC"
            )
        raise TransientInfraError(
            f"no partition of topic {self.topic!r} assigned to group {self.settings.kafka_consumer_group!r} "
            f"after {waited:.0f} s (more consumers than partitions, or the group coordinator on {servers} "
            "does not answer)"
        )

    # -- the loop -------------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Batches until `stop_requested` is set; a failed batch is retried after a back-off."""
        try:
            run_loop(self, self.stop_requested, interval_s=0.0, health=self.health)
        finally:
            self.close()

    def probe(self) -> None:
        """For /healthz: raises while the topic is missing or unassigned, or the last batch failed."""
        self.health.probe()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop after the current batch (main thread only)."""
        stop_on_signals(self.stop_requested)

    def close(self) -> None:
        if self._clients is None:
            return
        consumer, producer = self._clients
        self._clients = None
        try:
            producer.flush(timeout=10)
            producer.close(timeout=10)
        finally:
            consumer.close()  # commits nothing more (auto-commit is off) and leaves the group
