"""Fuzzing the CloudEvents Kafka binding (issue 16): any record, structured or binary, is either a
data change that can be stored, or refused with `InvalidEvent` and one of the dead-letter reasons
the consumer documents; never another exception (which would rewind the batch forever) and never
a hang. Seeded (derandomize) and bounded, so CI sees the same inputs every run."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.binding import parse_data_change
from domain.events import EVENT_TYPE, DataChange, InvalidEvent
from tests.domain.test_events import ATTRIBUTES, DATA, TRACEPARENT

# Every reason `consumers/binding.py` and `domain/events.py` give the dead-letter header.
DLQ_REASONS = frozenset(
    {
        "empty",
        "oversize",
        "not_cloudevent",
        "not_json",
        "not_object",
        "missing_field",
        "bad_specversion",
        "bad_attribute",
        "bad_header",
        "wrong_type",
        "bad_field",
        "bad_uri",
    }
)
MAX_BYTES = 4096
FUZZ = settings(
    max_examples=200, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Near-valid values are where parsers break: each attribute is either the contract's example, a
# plausible variant, or any JSON value (absent too).
attribute_values: dict[str, st.SearchStrategy[Any]] = {
    "specversion": st.sampled_from(["1.0", "0.3", "", "1"]) | json_values,
    "id": st.text(max_size=220) | json_values,
    "source": st.sampled_from(["//etl", "", "not a uri ::"]) | json_values,
    "type": st.sampled_from([EVENT_TYPE, "other.type", ""]) | json_values,
    "subject": st.text(max_size=220) | json_values,
    "time": st.sampled_from(["2026-11-23T10:00:00Z", "2026-13-45T99:00:00Z", "yesterday", "2026-11-23"])
    | st.datetimes().map(lambda d: d.isoformat())
    | json_values,
    "datacontenttype": st.sampled_from(["application/json", "text/plain", ""]) | json_values,
    "traceparent": st.sampled_from([TRACEPARENT, "00-zz", ""]) | json_values,
    "data_base64": st.sampled_from(["eyJhIjoxfQ==", "!!notbase64", ""]) | json_values,
}
data_values = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "dataset": st.sampled_from(["digits", ""]) | json_values,
            "uri": st.sampled_from(["s3://b/k.csv", "file:///d/v.csv", "http://x/y", "s3:", ""]) | json_values,
            "version": st.sampled_from(["v3", 4, True]) | json_values,
            "rows": st.sampled_from([0, 1500, -1, True, 2.5]) | json_values,
        },
    ),
)


@st.composite
def structured_events(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {**ATTRIBUTES, "data": DATA}
    for name in draw(st.sets(st.sampled_from([*attribute_values, "data"]), max_size=4)):
        if draw(st.booleans()):
            event.pop(name, None)
        else:
            event[name] = draw(data_values if name == "data" else attribute_values[name])
    extra = draw(st.dictionaries(st.text(max_size=12), json_values, max_size=2))
    return {**event, **extra}


header_names = st.sampled_from(
    ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_subject", "ce_time", "ce_traceparent", "content-type"]
) | st.text(max_size=12)
header_values = st.sampled_from([b"1.0", b"x1", b"//etl", EVENT_TYPE.encode(), b"application/json", b""]) | st.binary(
    max_size=40
)
VALID_BINARY = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"x1"),
    ("ce_source", b"//etl"),
    ("ce_type", EVENT_TYPE.encode()),
    ("content-type", b"application/json"),
]


def assert_accepted_or_refused(value: bytes | None, headers: list[tuple[str, bytes | None]]) -> None:
    try:
        change = parse_data_change(value, headers, max_bytes=MAX_BYTES)
    except InvalidEvent as refused:
        assert refused.reason in DLQ_REASONS, (refused.reason, refused.message)
        assert refused.code == "invalid_event" and refused.message
        return
    assert isinstance(change, DataChange)
    assert change.type == EVENT_TYPE and change.dataset and change.uri.split(":", 1)[0] in ("file", "s3")
    json.dumps(change.cloudevent)  # what the inbox stores must be JSON


@FUZZ
@given(event=structured_events())
def test_any_structured_event_is_a_data_change_or_a_dead_letter_reason(event: dict[str, Any]) -> None:
    assert_accepted_or_refused(json.dumps(event).encode(), [("content-type", b"application/cloudevents+json")])


@FUZZ
@given(value=st.none() | st.binary(max_size=MAX_BYTES + 16), content_type=header_values)
def test_any_bytes_as_a_structured_value_are_refused_with_a_reason(value: bytes | None, content_type: bytes) -> None:
    assert_accepted_or_refused(value, [("content-type", content_type)])


@FUZZ
@given(
    replaced=st.lists(st.tuples(header_names, st.none() | header_values), max_size=6),
    dropped=st.sets(st.sampled_from([name for name, _ in VALID_BINARY]), max_size=3),
    value=data_values.map(lambda data: json.dumps(data).encode()) | st.binary(max_size=64),
)
def test_any_binary_mode_record_is_a_data_change_or_a_dead_letter_reason(
    replaced: list[tuple[str, bytes | None]], dropped: set[str], value: bytes
) -> None:
    headers: list[tuple[str, bytes | None]] = [(name, raw) for name, raw in VALID_BINARY if name not in dropped]
    assert_accepted_or_refused(value, headers + replaced)


def test_the_fuzzed_strategies_reach_the_accepting_path() -> None:
    """Guards the fuzz above against refusing everything: the unmutated inputs are accepted."""
    structured = parse_data_change(
        json.dumps({**ATTRIBUTES, "data": DATA}).encode(), [("content-type", b"application/cloudevents+json")]
    )
    binary = parse_data_change(json.dumps(DATA).encode(), list(VALID_BINARY))
    assert (structured.dataset, binary.dataset) == ("digits", "digits")
