"""`retrainer publish data-changed` puts a W3C `traceparent` on the CloudEvent (consumers/publisher.py):
its `publish` span's when tracing is on; with `--traceparent`, a new trace's even when tracing is off;
none otherwise. The consumer's `consume` span continues it. The CLI runs as users run it (a process of
its own) against the real broker; spans go to a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from flows import tracing
from tests.consumers.conftest import Stage
from tests.consumers.test_consumer import drain

if TYPE_CHECKING:
    from tests.otlp_receiver import ReceivedSpan, Receiver

pytest_plugins = ("tests.otlp_receiver",)  # the `receiver` fixture
pytestmark = pytest.mark.integration

RETRAINER = str(Path(sys.executable).parent / "retrainer")
PRINTED = re.compile(r"\(traceparent 00-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-[0-9a-f]{2}\)")
OTEL = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER")


def publish(stage: Stage, event_id: str, *flags: str, traced: bool) -> str:
    """Runs the CLI (the test's OTEL_* variables point at the receiver; `traced=False` drops them);
    returns what it printed."""
    env = dict(os.environ, OTEL_SERVICE_NAME="retrainer-cli")
    if not traced:
        env = {k: v for k, v in env.items() if k not in (*OTEL, "OTEL_TRACES_EXPORTER")}
    uri = f"s3://datasets/{stage.dataset}.csv"
    args = ["publish", "data-changed", "--dataset", stage.dataset, "--uri", uri, "--id", event_id, *flags]
    done = subprocess.run([RETRAINER, *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"published {event_id} to {stage.settings.kafka_topic}" in done.stdout
    return done.stdout


def consumed(stage: Stage, receiver: Receiver, events: int) -> dict[object, ReceivedSpan]:
    """Consumes `events` events with tracing on; their `consume` spans by event id."""
    drain(stage, events)
    tracing.shutdown_tracing()  # flushes the batch to the receiver
    return {s.attributes["retrainer.event_id"]: s for s in receiver.named("consume")}


def test_the_consume_span_continues_the_publish_commands_span(stage: Stage, receiver: Receiver) -> None:
    output = publish(stage, f"{stage.dataset}-traced", traced=True)
    assert (printed := PRINTED.search(output)) is not None, output
    spans = consumed(stage, receiver, 1)

    (published,) = receiver.named("publish")  # exported by the CLI's process when it exited
    assert published.service == "retrainer-cli" and published.attributes["retrainer.dataset"] == stage.dataset
    assert (published.trace_id, published.span_id) == (printed["trace"], printed["span"])
    consume = spans[f"{stage.dataset}-traced"]
    assert (consume.trace_id, consume.parent_span_id) == (published.trace_id, published.span_id)
    assert consume.service == "retrainer-test"


def test_with_tracing_off_only_the_flag_starts_a_trace_that_the_consumer_continues(
    stage: Stage, receiver: Receiver
) -> None:
    flagged = PRINTED.search(publish(stage, f"{stage.dataset}-flagged", "--traceparent", traced=False))
    plain = publish(stage, f"{stage.dataset}-plain", traced=False)
    assert flagged is not None and "traceparent" not in plain
    spans = consumed(stage, receiver, 2)

    assert receiver.named("publish") == []  # the CLI recorded nothing: tracing was off there
    continued = spans[f"{stage.dataset}-flagged"]
    assert (continued.trace_id, continued.parent_span_id) == (flagged["trace"], flagged["span"])
    assert spans[f"{stage.dataset}-plain"].parent_span_id == ""  # no traceparent sent: a trace of its own
