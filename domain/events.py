"""Data-change events (CONTRACT section 1): the rules for a CloudEvent's `data`, and the typed event.

The CloudEvents envelope (both Kafka binding modes, the required attributes, specversion, time) is
read by the `cloudevents` SDK in `consumers/binding.py`; what is Retrainer's own is checked here:
the event type, `data.dataset` and `data.uri` (required; `file://` or `s3://`), `data.version` and
`data.rows` (optional), and an id short enough to be the inbox key.

`data_change` returns a `DataChange` or raises `InvalidEvent` with a short machine reason (used as
the dead-letter `retrainer-error` header and a metric label) and a sentence for people.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from domain.errors import InvalidInputError

EVENT_TYPE = "retrainer.data.changed"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
DEFAULT_MAX_BYTES = 1024 * 1024
# The inbox's column sizes: a longer value would fail the whole batch's insert, again on every redelivery.
MAX_LENGTHS = {"id": 200, "source": 500, "subject": 200}
_URI_SCHEMES = ("file", "s3")


class InvalidEvent(InvalidInputError):
    """A record on the data-change topic that is not a usable data-change event."""

    code = "invalid_event"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # short, low-cardinality: not_json, missing_field, wrong_type, …


@dataclass(frozen=True, slots=True)
class DataChange:
    event_id: str
    source: str
    type: str
    subject: str | None
    time: str | None
    dataset: str
    uri: str
    version: str | None
    rows: int | None
    cloudevent: dict[str, Any] = field(default_factory=dict)  # the event in structured form, as stored


def data_change(attributes: Mapping[str, Any], data: Any) -> DataChange:
    """The typed event from a CloudEvent's attributes (JSON values; `time` an RFC 3339 string) and data.

    The attributes are those of a valid CloudEvents 1.0 event (the SDK checked them); this adds the
    rules that make it a data change Retrainer can act on.
    """
    event_id, event_type = attributes["id"], attributes["type"]
    if event_type != EVENT_TYPE:
        raise InvalidEvent("wrong_type", f"type must be {EVENT_TYPE!r} (got {event_type!r})")
    for name, limit in MAX_LENGTHS.items():
        if len(attributes.get(name) or "") > limit:
            raise InvalidEvent("bad_field", f"{name} is longer than {limit} characters")
    if not isinstance(data, dict):
        raise InvalidEvent("missing_field", "data must be a JSON object with dataset and uri")
    dataset, uri = data.get("dataset"), data.get("uri")
    if not isinstance(dataset, str) or not dataset:
        raise InvalidEvent("missing_field", "data.dataset is required (the dataset's name)")
    if not isinstance(uri, str) or urlsplit(uri).scheme not in _URI_SCHEMES:
        raise InvalidEvent("bad_uri", f"data.uri must be a file:// or s3:// URI (got {uri!r})")
    version, rows = data.get("version"), data.get("rows")
    if version is not None and (not isinstance(version, str | int) or isinstance(version, bool)):
        raise InvalidEvent("bad_field", f"data.version must be a string (got {type(version).__name__})")
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 0):
        raise InvalidEvent("bad_field", f"data.rows must be a non-negative integer (got {rows!r})")
    return DataChange(
        event_id=event_id,
        source=attributes["source"],
        type=event_type,
        subject=attributes.get("subject"),
        time=attributes.get("time"),
        dataset=dataset,
        uri=uri,
        version=None if version is None else str(version),
        rows=rows,
        cloudevent={**attributes, "data": data},
    )
