"""OpenTelemetry traces (flows/tracing.py): one trace from a CloudEvent's `traceparent` to the alias
move, exported over OTLP/HTTP to a real receiver on loopback; off without OTEL_* variables."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cloudevents.core.v1.event import CloudEvent
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from sqlalchemy.orm import Session, sessionmaker

from consumers.binding import parse_data_change, to_kafka_message
from consumers.consumer import DataChangeConsumer
from consumers.publisher import data_changed_event
from domain import entities as e
from domain.errors import ConfigurationError
from domain.settings import load_settings
from flows import tracing
from flows.pipeline import run_pipeline
from flows.trigger_service import TriggerService
from flows.triggers import process_pending_events
from ml.training import seed_everything
from retrainer.logs import JsonFormatter
from storage import repositories as repo
from storage.db import transaction
from tests.consumers.conftest import delete_topics
from tests.flows.conftest import WEAK, spec
from tests.serving.test_canary_rollout import Stack, _champion, _disagreement, stack  # noqa: F401 (a fixture)

if TYPE_CHECKING:
    from tests.otlp_receiver import Receiver

PRODUCER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01"
pytest_plugins = ("tests.otlp_receiver",)  # the `receiver` fixture


@pytest.fixture
def topic(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A topic pair of the test's own on the real broker, and the consumer's settings pointing at it."""
    name = f"retrainer.test-trace-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(name, 1, 1), NewTopic(f"{name}.dlq", 1, 1)])
    admin.close()
    monkeypatch.setenv("RETRAINER_KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("RETRAINER_KAFKA_TOPIC", name)
    monkeypatch.setenv("RETRAINER_KAFKA_CONSUMER_GROUP", f"retrainer-test-{uuid.uuid4().hex[:8]}")
    yield name
    delete_topics(kafka_bootstrap, [name, f"{name}.dlq"])


@pytest.mark.integration
def test_one_trace_from_a_cloudevent_to_the_alias_move(
    env: sessionmaker[Session],
    digits: dict[str, Path],
    kafka_bootstrap: str,
    topic: str,
    receiver: Receiver,
) -> None:
    document = {**spec(**WEAK), "triggers": {"events": {"debounce_seconds": 0, "max_wait_seconds": 600}}}
    with transaction(env) as session:
        repo.upsert_pipeline(session, document["name"], document["dataset"], document)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logger, level = logging.getLogger("retrainer"), logging.getLogger("retrainer").level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # binary mode: the distributed-tracing extension travels as the ce_traceparent header
        event = data_changed_event("digits", f"file://{digits['v1']}", version="v1", event_id=f"evt-{uuid.uuid4()}")
        message = to_kafka_message(
            CloudEvent({**event.get_attributes(), "traceparent": TRACEPARENT}, event.get_data()), "binary"
        )
        assert "ce_traceparent" in message.headers
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        producer.send(topic, key=b"digits", value=message.value, headers=list(message.headers.items()))
        producer.flush(30)
        producer.close()

        consumer = DataChangeConsumer(load_settings(), env, poll_timeout_ms=200)
        try:
            deadline = time.monotonic() + 30
            while consumer.run_once().stored == 0:
                assert time.monotonic() < deadline, "the event never reached the inbox"
        finally:
            consumer.close()

        def run_in_process(run: e.Run) -> str | None:
            """The flow run as a Prefect worker would start it: it knows only the run id."""
            run_pipeline(run.pipeline, run.id)
            with transaction(env) as session:
                return repo.get_run(session, run.id).prefect_flow_run_id

        done = TriggerService(env, run_in_process).run_once()
        assert len(done.created) == 1 and len(done.submitted) == 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    with transaction(env) as session:
        assert repo.get_run(session, done.created[0].id).status is e.RunStatus.PROMOTED
    tracing.shutdown_tracing()  # flushes the batch to the receiver

    ours = [s for s in receiver.spans if s.trace_id == PRODUCER_TRACE]
    names = {s.name for s in ours}
    assert {"consume", "debounce", "submit", "pipeline", "gate", "alias move"} <= names, names
    tasks = {"task resolve-inputs", "task fetch-data", "task train", "task quantize", "task evaluate"}
    assert tasks | {"task gate-and-record"} <= names, names
    assert {s.trace_id for s in receiver.spans} == {PRODUCER_TRACE}, "every span is in the CloudEvent's trace"
    assert {s.service for s in ours} == {"retrainer-test"}
    by_id = {s.span_id: s for s in ours}

    def parent(name: str) -> str:
        return by_id[receiver.named(name)[0].parent_span_id].name

    # the chain: producer → consume; producer → debounce → submit → pipeline → task → gate → alias move
    assert receiver.named("consume")[0].parent_span_id == PRODUCER_SPAN
    assert receiver.named("debounce")[0].parent_span_id == PRODUCER_SPAN
    assert parent("submit") == "debounce" and parent("pipeline") == "submit"
    assert all(parent(name) == "pipeline" for name in tasks)
    assert parent("gate") == "task gate-and-record" and parent("alias move") == "task gate-and-record"
    assert receiver.named("consume")[0].attributes["retrainer.topic"] == topic
    assert receiver.named("gate")[0].attributes["retrainer.passed"] is True
    # log lines carry the trace: the run's last line has this trace id and its span's id
    finished = [json.loads(line) for line in lines.getvalue().splitlines() if "run finished" in line]
    assert finished and finished[0]["trace_id"] == PRODUCER_TRACE
    assert by_id[finished[0]["span_id"]].name == "pipeline"


def test_an_event_without_a_traceparent_is_stored_with_its_consume_span(receiver: Receiver) -> None:
    event = data_changed_event("digits", "s3://datasets/digits.csv", version="v9", event_id="evt-untraced")
    stored = []
    for mode in ("structured", "binary"):
        message = to_kafka_message(event, mode)
        parsed = parse_data_change(message.value, list(message.headers.items()))
        assert "traceparent" not in parsed.cloudevent
        with tracing.ConsumeSpans() as spans:
            stored.append(spans.add(parsed, topic="t", offset=0).cloudevent["traceparent"])
    tracing.shutdown_tracing()
    consumed = receiver.named("consume")
    assert all(s.parent_span_id == "" for s in consumed)  # each starts a trace, which its run continues
    assert [tuple(traceparent.split("-")[1:3]) for traceparent in stored] == [(s.trace_id, s.span_id) for s in consumed]


def test_tracing_is_off_without_otel_variables_and_a_traceparent_still_reaches_the_logs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    otel = (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "OTEL_TRACES_SAMPLER",
    )
    for name in (*otel, "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.configure_tracing()
    assert not tracing.enabled()
    record = logging.LogRecord("retrainer.test", logging.INFO, __file__, 1, "inside", (), None)
    with tracing.span("trigger", parent=TRACEPARENT):
        line = json.loads(JsonFormatter().format(record))
        assert tracing.current_traceparent() == TRACEPARENT  # passed on unchanged: no span of ours
    assert (line["trace_id"], line["span_id"]) == (PRODUCER_TRACE, PRODUCER_SPAN)
    outside = json.loads(JsonFormatter().format(record))
    assert outside["trace_id"] is None and outside["span_id"] is None
    with tracing.span("trigger", parent="not-a-traceparent"):
        assert tracing.current_traceparent() is None  # an invalid one is ignored (W3C), never an error


def test_an_unsupported_exporter_is_a_configuration_error_naming_the_variable() -> None:
    with pytest.raises(ConfigurationError) as raised:
        tracing.configure_tracing({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert raised.value.code == "configuration_error"
    assert "OTEL_TRACES_EXPORTER='zipkin'" in raised.value.message and "otlp" in raised.value.message
    assert not tracing.configure_tracing({"OTEL_TRACES_EXPORTER": "none", "OTEL_SERVICE_NAME": "x"})
    assert not tracing.configure_tracing({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert tracing.configure_tracing({"OTEL_TRACES_EXPORTER": "otlp"})
    tracing.shutdown_tracing()


def test_rollout_steps_and_the_alias_move_continue_the_runs_trace_and_inference_is_traced(
    stack: Stack,  # noqa: F811 (the fixture imported above)
    receiver: Receiver,
) -> None:
    champion = _champion(stack)
    candidate = stack.register("mlp", {"hidden_sizes": [16]}, seed=2)
    rollout_id, run_id = stack.start_rollout(candidate, champion, disagreement=_disagreement(2, 1))
    with transaction(stack.sessions) as session:  # what the run's submission left (flows/triggers.py)
        repo.update_run(session, run_id, evidence={"traceparent": TRACEPARENT})
    load = stack.traffic().start()
    try:
        result = stack.drive()
    finally:
        load.stop()
    assert result.status is e.RolloutStatus.PROMOTED, result.reason
    tracing.shutdown_tracing()

    steps = receiver.named("rollout step")
    assert [(s.attributes["retrainer.step"], s.attributes["retrainer.action"]) for s in steps] == [
        (1, "advance"),
        (2, "advance"),
        (3, "promote"),
    ]
    assert all(s.trace_id == PRODUCER_TRACE and s.parent_span_id == PRODUCER_SPAN for s in steps)
    assert {s.attributes["retrainer.rollout_id"] for s in steps} == {rollout_id}
    (move,) = receiver.named("alias move")
    assert move.trace_id == PRODUCER_TRACE and move.parent_span_id == steps[-1].span_id
    served = {(s.attributes["retrainer.variant"], s.attributes["retrainer.version"]) for s in receiver.named("infer")}
    assert {("champion", "1"), ("canary", "2")} <= served, served


def test_a_window_of_events_continues_the_first_traced_one_and_links_the_others(
    env: sessionmaker[Session], receiver: Receiver
) -> None:
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    document = {**spec(), "triggers": {"events": {"debounce_seconds": 0, "max_wait_seconds": 600}}}
    with transaction(env) as session:
        repo.upsert_pipeline(session, document["name"], document["dataset"], document)
        for n, traceparent in enumerate([None, TRACEPARENT, other]):
            payload = {"data": {"dataset": "digits", "uri": "file:///d.csv"}, "traceparent": traceparent}
            repo.add_to_inbox(
                session, event_id=f"evt-{n}", source="//tests", type="retrainer.data.changed", dataset="digits",
                payload={k: v for k, v in payload.items() if v},
            )  # fmt: skip
    (created,) = process_pending_events(env)
    tracing.shutdown_tracing()
    (debounce,) = receiver.named("debounce")
    assert (debounce.trace_id, debounce.parent_span_id) == (PRODUCER_TRACE, PRODUCER_SPAN)
    assert debounce.links == [("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")]
    assert debounce.attributes["retrainer.events"] == 3
    # where the run's submission continues: the debounce span
    assert created.run.evidence == {"traceparent": f"00-{PRODUCER_TRACE}-{debounce.span_id}-01"}


def test_span_ids_do_not_follow_the_seed_training_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training seeds Python's `random` in the process that exports spans; two runs of one spec
    must still draw different span and trace ids."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # never reached: nothing is flushed
    tracing.configure_tracing()
    try:
        ids = []
        for _ in range(2):
            seed_everything(0)
            with tracing.span("train") as current:
                ids.append((current.get_span_context().trace_id, current.get_span_context().span_id))
        assert ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]
    finally:
        tracing.shutdown_tracing()
