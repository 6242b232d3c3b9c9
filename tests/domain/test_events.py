"""The rules for a data-change event's `data` and type (CONTRACT section 1); the envelope is tested
with the binding in tests/consumers/test_binding.py."""

from __future__ import annotations

from typing import Any

import pytest

from domain.events import MAX_LENGTHS, InvalidEvent, data_change

ATTRIBUTES: dict[str, Any] = {
    "specversion": "1.0",
    "id": "b7c5",
    "source": "//warehouse/etl",
    "type": "retrainer.data.changed",
    "subject": "digits",
    "time": "2026-11-23T10:00:00Z",
    "datacontenttype": "application/json",
}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
DATA: dict[str, Any] = {"dataset": "digits", "version": "v3", "uri": "s3://datasets/digits/v3.csv", "rows": 1500}


def test_a_valid_event_becomes_a_typed_data_change_that_keeps_every_attribute() -> None:
    change = data_change({**ATTRIBUTES, "traceparent": TRACEPARENT}, DATA)
    assert (change.event_id, change.source, change.subject, change.time) == (
        "b7c5",
        "//warehouse/etl",
        "digits",
        "2026-11-23T10:00:00Z",
    )
    assert (change.dataset, change.uri, change.version, change.rows) == ("digits", DATA["uri"], "v3", 1500)
    assert change.cloudevent == {**ATTRIBUTES, "traceparent": TRACEPARENT, "data": DATA}  # extensions kept


def test_optional_fields_may_be_absent_and_an_integer_version_is_a_string() -> None:
    bare = {key: ATTRIBUTES[key] for key in ("specversion", "id", "source", "type")}
    change = data_change(bare, {"dataset": "d", "uri": "file:///data/v4.csv", "version": 4})
    assert (change.subject, change.time, change.rows, change.version) == (None, None, None, "4")


@pytest.mark.parametrize(
    ("attributes", "data", "reason"),
    [
        ({"type": "other.type"}, DATA, "wrong_type"),
        ({"id": "x" * (MAX_LENGTHS["id"] + 1)}, DATA, "bad_field"),
        ({"source": "/" * (MAX_LENGTHS["source"] + 1)}, DATA, "bad_field"),
        ({"subject": "s" * (MAX_LENGTHS["subject"] + 1)}, DATA, "bad_field"),
        ({}, "text", "missing_field"),
        ({}, None, "missing_field"),
        ({}, [DATA], "missing_field"),
        ({}, {"uri": "s3://b/k"}, "missing_field"),
        ({}, {"dataset": "", "uri": "s3://b/k"}, "missing_field"),
        ({}, {"dataset": "d"}, "bad_uri"),
        ({}, {"dataset": "d", "uri": "http://x/y"}, "bad_uri"),
        ({}, {"dataset": "d", "uri": "s3://b/k", "rows": -1}, "bad_field"),
        ({}, {"dataset": "d", "uri": "s3://b/k", "rows": True}, "bad_field"),
        ({}, {"dataset": "d", "uri": "s3://b/k", "version": ["v1"]}, "bad_field"),
    ],
)
def test_data_that_breaks_a_rule_is_refused_with_its_reason(attributes: dict[str, Any], data: Any, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        data_change({**ATTRIBUTES, **attributes}, data)
    assert info.value.reason == reason and info.value.code == "invalid_event" and info.value.message
