"""The CloudEvents Kafka protocol binding (CONTRACT section 1), through the `cloudevents` SDK.

Both modes, in both directions:
- structured: header `content-type: application/cloudevents+json`, the value is the whole event;
- binary: `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, … headers, the value is `data`.

`parse_data_change` turns a consumed record into a `domain.events.DataChange`: the SDK reads the
envelope and checks the CloudEvents attributes (required ones present, specversion 1.0, time an
RFC 3339 timestamp, extension names), `domain.events.data_change` checks `data`. Anything unusable
raises `InvalidEvent` with a short reason for the dead-letter header. `to_kafka_message` is the
producing side, used by `consumers/publisher.py`.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, from_structured, to_binary, to_structured
from cloudevents.core.exceptions import CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from domain.events import (
    DEFAULT_MAX_BYTES,
    STRUCTURED_CONTENT_TYPE,
    DataChange,
    InvalidEvent,
    data_change,
)

Mode = Literal["structured", "binary"]
_FORMAT = JSONFormat()
_REQUIRED = ("specversion", "id", "source", "type")


class ReceivedEvent(CloudEvent):
    """A CloudEvents 1.0 event exactly as received, checked by the SDK's own validation.

    The SDK's constructor fills in a missing id, time and specversion, which is right for an event
    being built but would hide a producer's mistake in one being read (and give every redelivery
    of an id-less record a new idempotency key). The SDK's validation errors become `InvalidEvent`.
    """

    def __init__(self, attributes: dict[str, Any], data: dict[str, Any] | str | bytes | None = None) -> None:
        try:
            self._validate_attribute(attributes=attributes)
        except CloudEventValidationError as error:
            raise _invalid_attributes(error, attributes) from error
        self._attributes = attributes
        self._data = data


def _invalid_attributes(error: CloudEventValidationError, attributes: dict[str, Any]) -> InvalidEvent:
    for name in _REQUIRED:
        if name in error.errors and not attributes.get(name):
            return InvalidEvent("missing_field", f"CloudEvent attribute {name!r} is missing or empty")
    if "specversion" in error.errors:
        return InvalidEvent("bad_specversion", f"specversion must be '1.0' (got {attributes['specversion']!r})")
    name, problems = next(iter(error.errors.items()))
    return InvalidEvent("bad_attribute", f"CloudEvent attribute {name!r} (got {attributes.get(name)!r}): {problems[0]}")


def parse_data_change(
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]] | None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> DataChange:
    """The data change a consumed record carries (value and headers as kafka-python gives them)."""
    if value is None:
        raise InvalidEvent("empty", "record has no value (a tombstone?); a data-change event needs one")
    if len(value) > max_bytes:
        raise InvalidEvent("oversize", f"record value is {len(value)} bytes, over the {max_bytes}-byte limit")
    # The record key stays out of the message: the SDK would add it to the event as a partitionkey
    # extension, and the stored event is what the producer sent.
    message = KafkaMessage(headers={key.lower(): raw or b"" for key, raw in headers or ()}, key=None, value=value)
    content_type = message.headers.get("content-type", b"").decode("utf-8", "replace").split(";")[0].strip().lower()
    if content_type == STRUCTURED_CONTENT_TYPE:
        event = _structured(message)
    elif any(key.startswith("ce_") for key in message.headers):
        event = _binary(message, content_type)
    elif content_type.startswith("application/cloudevents"):
        raise InvalidEvent("not_cloudevent", f"structured mode as {content_type} is not supported; send JSON")
    else:
        raise InvalidEvent(
            "not_cloudevent",
            f"not a CloudEvent: neither content-type {STRUCTURED_CONTENT_TYPE} nor ce_specversion/ce_id headers",
        )
    return as_data_change(event)


def as_data_change(event: BaseCloudEvent) -> DataChange:
    """The typed event, or `InvalidEvent` when `event` breaks a rule for data changes (`domain.events`)."""
    return data_change(_json_attributes(event), event.get_data())


def _structured(message: KafkaMessage) -> BaseCloudEvent:
    if message.value.lstrip()[:1] != b"{":  # cheap on the valid path; only a failure pays the json.loads
        try:
            json.loads(message.value)
        except ValueError as e:
            raise InvalidEvent("not_json", f"structured CloudEvent is not JSON ({e})") from e
        raise InvalidEvent("not_object", "structured CloudEvent must be a JSON object")
    try:
        event = from_structured(message, _FORMAT, ReceivedEvent)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidEvent("not_json", f"structured CloudEvent is not JSON ({e})") from e
    except binascii.Error as e:
        raise InvalidEvent("bad_attribute", f"data_base64 is not base64 ({e})") from e
    except (ValueError, TypeError) as e:  # dateutil's isoparse, the one other reader before validation
        raise _bad_time(e) from e
    return event


def _binary(message: KafkaMessage, content_type: str) -> BaseCloudEvent:
    try:
        event = from_binary(message, _FORMAT, ReceivedEvent)
    except UnicodeDecodeError as e:
        raise InvalidEvent("bad_header", f"a ce_* or content-type header is not UTF-8 ({e})") from e
    except ValueError as e:
        raise _bad_time(e) from e
    # The SDK keeps a value it cannot read as JSON as text or bytes; the contract wants a JSON object.
    if event.get_data() is None or isinstance(event.get_data(), str | bytes):
        shown = content_type or "absent, read as application/json"
        raise InvalidEvent("not_json", f"binary-mode data is not JSON (content-type {shown}); send a JSON object")
    return event


def _bad_time(error: Exception) -> InvalidEvent:
    return InvalidEvent(
        "bad_attribute", f"CloudEvent attribute 'time' is not an RFC 3339 timestamp like 2026-11-23T10:00:00Z ({error})"
    )


def _json_attributes(event: BaseCloudEvent) -> dict[str, Any]:
    """The attributes as JSON values (the event is stored in structured form): time as the SDK writes it."""
    attributes = dict(event.get_attributes())
    time = attributes.get("time")
    if isinstance(time, datetime):
        text = time.isoformat()
        attributes["time"] = text[:-6] + "Z" if text.endswith("+00:00") else text
    return attributes


def to_kafka_message(event: BaseCloudEvent, mode: Mode = "structured") -> KafkaMessage:
    """The record for `event` in either binding mode, keyed by `data.dataset` (one dataset's events stay ordered)."""
    data = event.get_data()
    dataset = data.get("dataset") if isinstance(data, dict) else None
    if not isinstance(dataset, str):
        raise InvalidEvent("missing_field", "data.dataset is required to key the record (the dataset's name)")
    encode = to_structured if mode == "structured" else to_binary
    return encode(event, _FORMAT, lambda _event: dataset)
