"""Each test gets its own topic pair (3 partitions + DLQ) and consumer group on the real broker,
and a dataset/pipeline name of its own in the shared PostgreSQL test database."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, UnknownTopicOrPartitionError
from sqlalchemy.orm import Session, sessionmaker

import migrations
from consumers.binding import to_kafka_message
from consumers.publisher import data_changed_event
from domain.settings import Settings, load_settings
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction


@dataclass
class Stage:
    settings: Settings
    sessions: sessionmaker[Session]
    dataset: str
    pipeline: str

    def produce(self, values: list[tuple[bytes | None, list[tuple[str, bytes]]]], key: bytes | None = None) -> None:
        producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap_servers, acks="all", linger_ms=5)
        for value, headers in values:
            producer.send(self.settings.kafka_topic, key=key or self.dataset.encode(), value=value, headers=headers)
        producer.flush(30)
        producer.close()

    def valid(self, event_id: str) -> tuple[bytes, list[tuple[str, bytes]]]:
        unique = f"{self.dataset}-{event_id}"  # the inbox is shared across tests: ids must not collide
        event = data_changed_event(self.dataset, f"s3://datasets/{self.dataset}.csv", version=event_id, event_id=unique)
        message = to_kafka_message(event)
        return message.value, list(message.headers.items())

    def inbox_count(self) -> int:
        with transaction(self.sessions) as session:
            return len(repo.pending_events(session, self.dataset))

    def dlq(self, expected: int, timeout_ms: int = 20000) -> list[object]:
        consumer = KafkaConsumer(
            self.settings.kafka_dlq_topic,
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            auto_offset_reset="earliest",
            consumer_timeout_ms=timeout_ms,
            group_id=f"dlq-reader-{uuid.uuid4().hex[:6]}",
        )
        records = []
        for record in consumer:
            records.append(record)
            if len(records) >= expected:
                break
        consumer.close()
        return records


@pytest.fixture
def stage(kafka_bootstrap: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stage]:
    suffix = uuid.uuid4().hex[:8]
    topic = f"retrainer.test-{suffix}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, 3, 1), NewTopic(f"{topic}.dlq", 1, 1)])
    admin.close()
    env = {
        "RETRAINER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RETRAINER_KAFKA_TOPIC": topic,
        "RETRAINER_KAFKA_CONSUMER_GROUP": f"retrainer-test-{suffix}",
        "RETRAINER_DATABASE_URL": postgres_url,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    migrations.upgrade(postgres_url)
    sessions = make_sessions(create_db_engine(postgres_url))
    dataset, pipeline = f"ds-{suffix}", f"pl-{suffix}"
    with transaction(sessions) as session:
        repo.upsert_pipeline(
            session,
            pipeline,
            dataset,
            {
                "name": pipeline,
                "dataset": dataset,
                "model": {"architecture": "mlp", "input_shape": [64], "output_classes": 10},
                "triggers": {"events": {"debounce_seconds": 0, "max_wait_seconds": 600}},
            },
        )
    yield Stage(load_settings(), sessions, dataset, pipeline)
    delete_topics(kafka_bootstrap, [topic, f"{topic}.dlq"])


def delete_topics(bootstrap: str, topics: list[str], timeout: float = 60) -> None:
    """A fresh admin client, retried: a test may have restarted the broker, and a client connected before
    the restart (or one whose first metadata request meets a broker still starting) says NodeNotReady."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            try:
                admin.delete_topics(topics)
            finally:
                admin.close()
            return
        except UnknownTopicOrPartitionError:  # an earlier try deleted them before its answer was lost
            return
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
