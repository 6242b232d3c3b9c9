"""The decision relay against the real broker (a topic of its own per test) and a metadata database of
its own (SQLite, so no other test's decisions share the outbox): every event of a short story arrives,
the same ids again after a relay dies between the broker's ack and its commit, and nothing is lost
while the broker cannot be reached."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.kafka import KafkaMessage, from_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import NewTopic
from sqlalchemy.orm import Session, sessionmaker

import migrations
from consumers.decisions import KafkaDecisionSink
from domain import entities as e
from domain.decisions import DecisionEvent
from domain.errors import TransientInfraError
from flows.relay import DecisionRelay
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.consumers.conftest import delete_topics

PIPELINE = "relayed"


@dataclass
class Stage:
    sessions: sessionmaker[Session]
    bootstrap: str
    topic: str

    def sink(self) -> KafkaDecisionSink:
        return KafkaDecisionSink(self.bootstrap, self.topic, timeout_s=10)

    def story(self) -> None:
        """A run is created, starts and is promoted: five decisions."""
        with transaction(self.sessions) as session:
            run, _ = repo.create_run(session, PIPELINE, e.TriggerKind.MANUAL, reason="a story")
            repo.update_run(session, run.id, status=e.RunStatus.RUNNING)
        with transaction(self.sessions) as session:
            checks = [e.GateCheck("overall", "overall", e.Verdict.PASS, "all checks passed")]
            repo.record_gate_checks(session, run.id, checks)
            version = repo.register_model_version(
                session, PIPELINE, metrics={}, artifact_uri="file:///m.pt", sha256="a" * 64, size_bytes=1, run_id=run.id
            )
            repo.move_champion(session, PIPELINE, version.id, expected_from_version_id=None, actor="gate", reason="ok")
            repo.update_run(session, run.id, status=e.RunStatus.PROMOTED)

    def outbox(self, *, sent: bool | None = None) -> list[DecisionEvent]:
        with transaction(self.sessions) as session:
            return repo.outbox_events(session, sent=sent)

    def consume(self, expected: int) -> list[tuple[bytes, BaseCloudEvent]]:
        """(key, event) of the first `expected` records, each read back as a CloudEvent by the SDK."""
        consumer = KafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            consumer_timeout_ms=15000,
            group_id=f"reader-{uuid.uuid4().hex[:6]}",
        )
        records = []
        for record in consumer:
            message = KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value)
            records.append((record.key, from_structured(message, JSONFormat(), CloudEvent)))
            if len(records) >= expected:
                break
        consumer.close()
        return records


@pytest.fixture
def stage(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Stage]:
    topic = f"retrainer.decisions-test-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, 3, 1)])
    admin.close()
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    migrations.upgrade(url)
    sessions = make_sessions(create_db_engine(url))
    with transaction(sessions) as session:
        spec = {"name": PIPELINE, "dataset": "d", "model": {"architecture": "mlp"}}
        repo.upsert_pipeline(session, PIPELINE, "d", spec)
    yield Stage(sessions, kafka_bootstrap, topic)
    delete_topics(kafka_bootstrap, [topic])


def test_every_decision_arrives_keyed_by_pipeline(stage: Stage) -> None:
    stage.story()
    outbox = stage.outbox()
    assert len(outbox) == 5
    sink = stage.sink()
    try:
        assert DecisionRelay(stage.sessions, sink).run_once() == 5
        assert DecisionRelay(stage.sessions, sink).run_once() == 0  # sent once: nothing left
    finally:
        sink.close()
    records = stage.consume(5)
    assert {key for key, _ in records} == {PIPELINE.encode()}
    assert sorted(event.get_id() for _, event in records) == sorted(event.id for event in outbox)
    got = {event.get_id(): event for _, event in records}
    for event in outbox:
        assert got[event.id].get_type() == event.type.value
        assert got[event.id].get_subject() == PIPELINE
        assert got[event.id].get_data() == event.data
    assert stage.outbox(sent=False) == []


class _DiesAfterTheAck:
    """The real sink, then the process 'dies' before the relay commits that the events were sent."""

    def __init__(self, sink: KafkaDecisionSink) -> None:
        self.sink = sink

    def publish(self, events: Sequence[DecisionEvent]) -> None:
        self.sink.publish(events)
        raise SystemExit("killed between the broker's ack and the outbox commit")


def test_a_relay_killed_before_its_commit_resends_the_same_ids(stage: Stage) -> None:
    stage.story()
    sink = stage.sink()
    try:
        with pytest.raises(SystemExit):
            DecisionRelay(stage.sessions, _DiesAfterTheAck(sink)).run_once()
        assert len(stage.outbox(sent=False)) == 5  # the commit never happened
        assert DecisionRelay(stage.sessions, sink).run_once() == 5
    finally:
        sink.close()
    records = stage.consume(10)
    ids = [event.get_id() for _, event in records]
    assert len(ids) == 10  # at least once: every event twice
    assert sorted(set(ids)) == sorted(event.id for event in stage.outbox())  # deduplicated by id: the outbox


def test_an_unreachable_broker_keeps_the_events_until_it_answers(stage: Stage) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    stage.story()
    unreachable = KafkaDecisionSink(dead, stage.topic, timeout_s=1)
    with pytest.raises(TransientInfraError) as refused:
        DecisionRelay(stage.sessions, unreachable).run_once()
    assert refused.value.code == TransientInfraError.code and refused.value.retryable
    assert len(stage.outbox(sent=False)) == 5
    sink = stage.sink()
    try:
        assert DecisionRelay(stage.sessions, sink).run_once() == 5
    finally:
        sink.close()
    assert {event.get_id() for _, event in stage.consume(5)} == {event.id for event in stage.outbox(sent=True)}
