"""Data-change events: CloudEvents 1.0 over Kafka (CONTRACT section 1), parsed and checked.

Both Kafka protocol binding modes are accepted:
- structured: header `content-type: application/cloudevents+json`, the value is the whole event;
- binary: `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, … headers, the value is `data`.

`parse_data_change` returns a `DataChange` or raises `InvalidEvent` with a short machine reason
(used as the dead-letter `retrainer-error` header and a metric label) and a sentence for people.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from domain.errors import InvalidInputError

EVENT_TYPE = "retrainer.data.changed"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
DEFAULT_MAX_BYTES = 1024 * 1024
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


def _headers(headers: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in headers or ():
        try:
            result[key.lower()] = (value or b"").decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidEvent("bad_header", f"header {key!r} is not UTF-8") from e
    return result


def _json(value: bytes, what: str) -> Any:
    try:
        return json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidEvent("not_json", f"{what} is not JSON ({e})") from e


def parse_data_change(
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]] | None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> DataChange:
    if value is None:
        raise InvalidEvent("empty", "record has no value (a tombstone?); a data-change event needs one")
    if len(value) > max_bytes:
        raise InvalidEvent("oversize", f"record value is {len(value)} bytes, over the {max_bytes}-byte limit")
    hdrs = _headers(headers)
    content_type = hdrs.get("content-type", "").split(";")[0].strip().lower()
    if content_type == STRUCTURED_CONTENT_TYPE:
        event = _json(value, "structured CloudEvent")
        if not isinstance(event, dict):
            raise InvalidEvent("not_object", "structured CloudEvent must be a JSON object")
    elif "ce_specversion" in hdrs or "ce_id" in hdrs:
        event = {key[3:]: val for key, val in hdrs.items() if key.startswith("ce_")}
        event["datacontenttype"] = content_type or "application/json"
        event["data"] = _json(value, "binary-mode data")
    else:
        raise InvalidEvent(
            "not_cloudevent",
            f"not a CloudEvent: neither content-type {STRUCTURED_CONTENT_TYPE} nor ce_specversion/ce_id headers",
        )
    return _check(event)


def _check(event: dict[str, Any]) -> DataChange:
    for attribute in ("specversion", "id", "source", "type"):
        if not isinstance(event.get(attribute), str) or not event[attribute]:
            raise InvalidEvent("missing_field", f"CloudEvent attribute {attribute!r} is missing or empty")
    if event["specversion"] != "1.0":
        raise InvalidEvent("bad_specversion", f"specversion must be '1.0' (got {event['specversion']!r})")
    if event["type"] != EVENT_TYPE:
        raise InvalidEvent("wrong_type", f"type must be {EVENT_TYPE!r} (got {event['type']!r})")
    data = event.get("data")
    if not isinstance(data, dict):
        raise InvalidEvent("missing_field", "data must be a JSON object with dataset and uri")
    dataset, uri = data.get("dataset"), data.get("uri")
    if not isinstance(dataset, str) or not dataset:
        raise InvalidEvent("missing_field", "data.dataset is required (the dataset's name)")
    if not isinstance(uri, str) or urlsplit(uri).scheme not in _URI_SCHEMES:
        raise InvalidEvent("bad_uri", f"data.uri must be a file:// or s3:// URI (got {uri!r})")
    version, rows = data.get("version"), data.get("rows")
    if version is not None and not isinstance(version, str | int):
        raise InvalidEvent("bad_field", f"data.version must be a string (got {type(version).__name__})")
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 0):
        raise InvalidEvent("bad_field", f"data.rows must be a non-negative integer (got {rows!r})")
    if len(event["id"]) > 200:
        raise InvalidEvent("bad_field", "id is longer than 200 characters")
    return DataChange(
        event_id=event["id"],
        source=event["source"],
        type=event["type"],
        subject=event.get("subject"),
        time=event.get("time"),
        dataset=dataset,
        uri=uri,
        version=None if version is None else str(version),
        rows=rows,
        cloudevent=event,
    )
