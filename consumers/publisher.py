"""Publishing data-change events (CloudEvents built by the `cloudevents` SDK) for producers and the CLI.

The producer is idempotent-minded: acks=all, the dataset as the record key (one dataset's events
stay ordered in one partition), and the event id chosen by the caller so a retried publish of the
same change is deduplicated by the consumer's inbox. Structured mode by default; binary mode is
the same event with its attributes in `ce_*` headers (`consumers/binding.py`).

An event carries a W3C `traceparent` (the CloudEvents distributed-tracing extension) when there is a
trace to continue (`with_traceparent`): the consumer's `consume` span and the run made from the event
then join the publisher's trace (flows/tracing.py).
"""

from __future__ import annotations

from typing import Any

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.exceptions import CloudEventValidationError
from cloudevents.core.v1.event import CloudEvent
from kafka import KafkaProducer
from kafka.errors import KafkaError

from consumers.binding import Mode, as_data_change, to_kafka_message
from domain.errors import InvalidInputError, TransientInfraError
from domain.events import EVENT_TYPE
from flows.tracing import SystemRandomIds, current_traceparent

_IDS = SystemRandomIds()


def data_changed_event(
    dataset: str,
    uri: str,
    *,
    version: str | None = None,
    rows: int | None = None,
    event_id: str | None = None,
    source: str = "//retrainer/cli",
) -> CloudEvent:
    """A `retrainer.data.changed` event; the SDK sets specversion 1.0, the time (now) and, lacking `event_id`, an id."""
    data: dict[str, Any] = {"dataset": dataset, "uri": uri}
    if version is not None:
        data["version"] = version
    if rows is not None:
        data["rows"] = rows
    attributes: dict[str, Any] = {
        "source": source,
        "type": EVENT_TYPE,
        "subject": dataset,
        "datacontenttype": "application/json",
    }
    if event_id is not None:
        attributes["id"] = event_id
    try:
        event = CloudEvent(attributes, data)
    except CloudEventValidationError as error:
        raise InvalidInputError(f"cannot build the data-change event: {error}") from error
    as_data_change(event)  # a URI the consumer would dead-letter is refused here, where the caller sees it
    return event


def with_traceparent(event: BaseCloudEvent, *, new_trace: bool = False) -> BaseCloudEvent:
    """The event with a `traceparent`: its own when it has one; else the current span's (tracing on, or
    a `traceparent` received and passed on); else, with `new_trace`, one of a new trace (sampled, so a
    consumer with traces on records its spans); else the event unchanged."""
    if event.get_extension("traceparent"):
        return event
    traceparent = current_traceparent()
    if traceparent is None and new_trace:
        traceparent = f"00-{_IDS.generate_trace_id():032x}-{_IDS.generate_span_id():016x}-01"
    if traceparent is None:
        return event
    return CloudEvent({**event.get_attributes(), "traceparent": traceparent}, event.get_data())


def publish_data_changed(
    bootstrap_servers: str,
    topic: str,
    event: BaseCloudEvent,
    timeout_s: float = 10.0,
    *,
    mode: Mode = "structured",
) -> str:
    """Sends one CloudEvent (with the current span's `traceparent` when it has none, `with_traceparent`)
    and waits for the broker's acknowledgement; returns its id."""
    message = to_kafka_message(with_traceparent(event), mode)
    try:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers.split(","), acks="all", max_block_ms=int(timeout_s * 1000), retries=5
        )
    except KafkaError as e:
        raise TransientInfraError(
            f"RETRAINER_KAFKA_BOOTSTRAP_SERVERS={bootstrap_servers}: no Kafka broker answers ({e})"
        ) from e
    try:
        future = producer.send(
            topic, key=_bytes(message.key), value=message.value, headers=list(message.headers.items())
        )
        future.get(timeout=timeout_s)
    except KafkaError as e:
        raise TransientInfraError(f"publishing to {topic} on {bootstrap_servers} failed ({e})") from e
    finally:
        producer.close(timeout=timeout_s)
    return event.get_id()


def _bytes(key: str | bytes | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key
