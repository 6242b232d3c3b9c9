"""CloudEvent parsing (CONTRACT section 1): both binding modes, every way to be invalid."""

from __future__ import annotations

import json
from typing import Any

import pytest

from domain.events import InvalidEvent, parse_data_change

STRUCTURED = [("content-type", b"application/cloudevents+json")]


def event(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "b7c5",
        "source": "//warehouse/etl",
        "type": "retrainer.data.changed",
        "subject": "digits",
        "time": "2026-11-23T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"dataset": "digits", "version": "v3", "uri": "s3://datasets/digits/v3.csv", "rows": 1500},
    }
    base.update(changes)
    return base


def test_structured_mode() -> None:
    parsed = parse_data_change(json.dumps(event()).encode(), STRUCTURED)
    assert (parsed.event_id, parsed.dataset, parsed.version, parsed.uri, parsed.rows) == (
        "b7c5",
        "digits",
        "v3",
        "s3://datasets/digits/v3.csv",
        1500,
    )
    assert parsed.cloudevent["data"]["dataset"] == "digits"


def test_binary_mode() -> None:
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"x1"),
        ("ce_source", b"//etl"),
        ("ce_type", b"retrainer.data.changed"),
        ("ce_subject", b"digits"),
        ("Content-Type", b"application/json"),
    ]
    parsed = parse_data_change(b'{"dataset": "digits", "uri": "file:///data/v4.csv"}', headers)
    assert (parsed.event_id, parsed.source, parsed.uri, parsed.version) == ("x1", "//etl", "file:///data/v4.csv", None)
    assert parsed.cloudevent["data"] == {"dataset": "digits", "uri": "file:///data/v4.csv"}


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b"not json", STRUCTURED, "not_json"),
        (b"[1, 2]", STRUCTURED, "not_object"),
        (json.dumps(event()).encode(), [], "not_cloudevent"),
        (None, STRUCTURED, "empty"),
        (json.dumps(event(type="other.type")).encode(), STRUCTURED, "wrong_type"),
        (json.dumps(event(specversion="0.3")).encode(), STRUCTURED, "bad_specversion"),
        (json.dumps(event(id="")).encode(), STRUCTURED, "missing_field"),
        (json.dumps(event(data={"uri": "s3://b/k"})).encode(), STRUCTURED, "missing_field"),
        (json.dumps(event(data={"dataset": "d", "uri": "http://x/y"})).encode(), STRUCTURED, "bad_uri"),
        (json.dumps(event(data={"dataset": "d", "uri": "s3://b/k", "rows": -1})).encode(), STRUCTURED, "bad_field"),
        (json.dumps(event(data="text")).encode(), STRUCTURED, "missing_field"),
        (b"x" * 2_000_000, STRUCTURED, "oversize"),
        (b'{"dataset": "d", "uri": "s3://b/k"}', [("ce_id", b"1"), ("ce_specversion", b"1.0")], "missing_field"),
    ],
)
def test_invalid_records_are_named(value: bytes | None, headers: list[tuple[str, bytes]], reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_data_change(value, headers)
    assert info.value.reason == reason and info.value.code == "invalid_event" and info.value.message
