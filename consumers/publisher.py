"""Publishing data-change events (structured CloudEvents) for producers and the CLI.

The producer is idempotent-minded: acks=all, the dataset as the record key (one dataset's events
stay ordered in one partition), and the event id chosen by the caller so a retried publish of the
same change is deduplicated by the consumer's inbox.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from domain.errors import TransientInfraError
from domain.events import EVENT_TYPE, STRUCTURED_CONTENT_TYPE


def data_changed_event(
    dataset: str,
    uri: str,
    *,
    version: str | None = None,
    rows: int | None = None,
    event_id: str | None = None,
    source: str = "//retrainer/cli",
) -> dict[str, Any]:
    data: dict[str, Any] = {"dataset": dataset, "uri": uri}
    if version is not None:
        data["version"] = version
    if rows is not None:
        data["rows"] = rows
    return {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": EVENT_TYPE,
        "subject": dataset,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }


def publish_data_changed(bootstrap_servers: str, topic: str, event: dict[str, Any], timeout_s: float = 10.0) -> str:
    """Sends one structured CloudEvent and waits for the broker's acknowledgement; returns its id."""
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
            topic,
            key=event["data"]["dataset"].encode(),
            value=json.dumps(event).encode(),
            headers=[("content-type", STRUCTURED_CONTENT_TYPE.encode())],
        )
        future.get(timeout=timeout_s)
    except KafkaError as e:
        raise TransientInfraError(f"publishing to {topic} on {bootstrap_servers} failed ({e})") from e
    finally:
        producer.close(timeout=timeout_s)
    return str(event["id"])
