"""The CloudEvents Kafka binding (CONTRACT section 1) through the SDK: both modes in both directions,
and every way a record can be unusable, each with its dead-letter reason. Needs no broker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumers.binding import parse_data_change, to_kafka_message
from consumers.publisher import data_changed_event
from domain.errors import InvalidInputError
from domain.events import InvalidEvent
from tests.domain.test_events import ATTRIBUTES, DATA, TRACEPARENT

STRUCTURED = [("content-type", b"application/cloudevents+json")]


def event(**changes: Any) -> dict[str, Any]:
    """The contract's example event, with `changes` (None removes an attribute)."""
    merged: dict[str, Any] = {**ATTRIBUTES, "data": DATA, **changes}
    return {key: value for key, value in merged.items() if value is not None}


def binary_headers(**changes: bytes | None) -> list[tuple[str, bytes]]:
    headers: dict[str, bytes | None] = {
        "ce_specversion": b"1.0",
        "ce_id": b"x1",
        "ce_source": b"//etl",
        "ce_type": b"retrainer.data.changed",
        "ce_subject": b"digits",
        "Content-Type": b"application/json",
    }
    headers.update(changes)
    return [(key, value) for key, value in headers.items() if value is not None]


def test_structured_mode_is_stored_as_received() -> None:
    parsed = parse_data_change(json.dumps(event(traceparent=TRACEPARENT)).encode(), STRUCTURED)
    assert (parsed.event_id, parsed.dataset, parsed.version, parsed.uri, parsed.rows, parsed.time) == (
        "b7c5",
        "digits",
        "v3",
        "s3://datasets/digits/v3.csv",
        1500,
        "2026-11-23T10:00:00Z",
    )
    assert parsed.cloudevent == event(traceparent=TRACEPARENT)  # the traceparent extension travels on


def test_binary_mode_with_mixed_case_headers_and_an_extension() -> None:
    headers = binary_headers(ce_traceparent=TRACEPARENT.encode())
    parsed = parse_data_change(b'{"dataset": "digits", "uri": "file:///data/v4.csv"}', headers)
    assert (parsed.event_id, parsed.source, parsed.uri, parsed.version) == ("x1", "//etl", "file:///data/v4.csv", None)
    assert parsed.cloudevent["data"] == {"dataset": "digits", "uri": "file:///data/v4.csv"}
    assert parsed.cloudevent["traceparent"] == TRACEPARENT
    assert parsed.cloudevent["datacontenttype"] == "application/json" and "partitionkey" not in parsed.cloudevent


def test_a_missing_id_or_time_is_not_invented() -> None:
    """The SDK's constructor fills both in for new events; a received one must not get a fresh idempotency key."""
    parsed = parse_data_change(json.dumps(event(time=None)).encode(), STRUCTURED)
    assert parsed.time is None and "time" not in parsed.cloudevent
    with pytest.raises(InvalidEvent) as info:
        parse_data_change(json.dumps(event(id=None)).encode(), STRUCTURED)
    assert info.value.reason == "missing_field" and "'id'" in info.value.message


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_what_the_publisher_builds_the_consumer_reads_back(mode: str) -> None:
    built = data_changed_event("digits", "s3://datasets/digits/v5.csv", version="v5", rows=10, event_id="etl-5")
    message = to_kafka_message(built, mode)  # type: ignore[arg-type]
    assert message.key == "digits"
    content_type = dict(message.headers)["content-type"]
    assert content_type == (b"application/cloudevents+json" if mode == "structured" else b"application/json")
    parsed = parse_data_change(message.value, list(message.headers.items()))
    assert (parsed.event_id, parsed.source, parsed.dataset, parsed.version, parsed.rows) == (
        "etl-5",
        "//retrainer/cli",
        "digits",
        "v5",
        10,
    )
    assert parsed.time is not None and parsed.time.endswith("Z")


def test_the_publisher_refuses_what_the_consumer_would_dead_letter() -> None:
    with pytest.raises(InvalidEvent) as info:
        data_changed_event("digits", "http://example.com/v1.csv")
    assert info.value.reason == "bad_uri" and info.value.code == "invalid_event"
    with pytest.raises(InvalidInputError) as refused:
        data_changed_event("digits", "s3://datasets/digits/v5.csv", event_id="")
    assert refused.value.code == "invalid_input" and "'id'" in str(refused.value)


@pytest.mark.parametrize(
    ("value", "headers", "reason", "fragment"),
    [
        (None, STRUCTURED, "empty", "tombstone"),
        (b"x" * 2_000_000, STRUCTURED, "oversize", "2000000 bytes"),
        (json.dumps(event()).encode(), [], "not_cloudevent", "neither content-type"),
        (json.dumps(event()).encode(), [("content-type", b"application/cloudevents+avro")], "not_cloudevent", "avro"),
        (b"not json", STRUCTURED, "not_json", "not JSON"),
        (b"{not json", STRUCTURED, "not_json", "not JSON"),
        (b"\xff\xfe{}", STRUCTURED, "not_json", "not JSON"),
        (b"[1, 2]", STRUCTURED, "not_object", "JSON object"),
        (b'"text"', STRUCTURED, "not_object", "JSON object"),
        (json.dumps(event(type="other.type")).encode(), STRUCTURED, "wrong_type", "'other.type'"),
        (json.dumps(event(specversion="0.3")).encode(), STRUCTURED, "bad_specversion", "'0.3'"),
        (json.dumps(event(specversion=None)).encode(), STRUCTURED, "missing_field", "'specversion'"),
        (json.dumps(event(id="")).encode(), STRUCTURED, "missing_field", "'id'"),
        (json.dumps(event(source=None)).encode(), STRUCTURED, "missing_field", "'source'"),
        (json.dumps(event(id=5)).encode(), STRUCTURED, "bad_attribute", "'id'"),
        (json.dumps(event(time="yesterday")).encode(), STRUCTURED, "bad_attribute", "RFC 3339"),
        (json.dumps(event(time=1700000000)).encode(), STRUCTURED, "bad_attribute", "RFC 3339"),
        (json.dumps(event(time="2026-11-23T10:00:00")).encode(), STRUCTURED, "bad_attribute", "timezone"),
        (json.dumps(event(traceParent="x")).encode(), STRUCTURED, "bad_attribute", "'traceParent'"),
        (json.dumps(event(data={"uri": "s3://b/k"})).encode(), STRUCTURED, "missing_field", "data.dataset"),
        (json.dumps(event(data={"dataset": "d", "uri": "http://x/y"})).encode(), STRUCTURED, "bad_uri", "http://x/y"),
        (json.dumps(event(data="text")).encode(), STRUCTURED, "missing_field", "JSON object"),
        (b'{"dataset": "d", "uri": "s3://b/k"}', [("ce_id", b"1"), ("ce_specversion", b"1.0")], "missing_field", ""),
        (b"not json", binary_headers(), "not_json", "application/json"),
        (b"", binary_headers(), "not_json", "binary-mode data"),
        (b'{"dataset": "d"}', binary_headers(**{"Content-Type": b"text/plain"}), "not_json", "text/plain"),
        (b'{"dataset": "d", "uri": "s3://b/k"}', binary_headers(ce_id=b"\xff"), "bad_header", "UTF-8"),
        (b'{"dataset": "d", "uri": "s3://b/k"}', binary_headers(ce_time=b"soon"), "bad_attribute", "RFC 3339"),
        (b'{"dataset": "d", "uri": "s3://b/k"}', binary_headers(ce_specversion=b"0.3"), "bad_specversion", "'0.3'"),
    ],
)
def test_invalid_records_are_named(
    value: bytes | None, headers: list[tuple[str, bytes]], reason: str, fragment: str
) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_data_change(value, headers)
    assert info.value.reason == reason, info.value.message
    assert info.value.code == "invalid_event" and fragment in info.value.message, info.value.message
