"""Reads the dead-letter topic's newest records for the dashboard (`api/dashboard.py`, /ui/dead-letters).

The consumer (`consumers/consumer.py`) sends each event it refuses to RETRAINER_KAFKA_DLQ_TOPIC
(default: the event topic plus `.dlq`) with a `retrainer-error` header ("reason: message") and the
event's original topic, partition and offset. This reader joins no consumer group and commits
nothing: it assigns every partition, seeks to the last `per_partition` offsets and reads up to
the end offsets it saw, within `timeout_s` in all, so a page view costs a bounded time and never
moves anyone's offsets. A broker that does not answer, or a topic that does not exist yet, comes
back as `DeadLetters.problem` for the page to say, never as an exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from domain.settings import Settings
from web.dashboard_views import DeadLetterRow, DeadLetters

DEFAULT_PER_PARTITION = 20
DEFAULT_TIMEOUT_S = 3.0
PREVIEW_BYTES = 300
ERROR_HEADER = "retrainer-error"

DeadLetterReader = Callable[[], DeadLetters]


def dead_letter_reader(
    settings: Settings, *, per_partition: int = DEFAULT_PER_PARTITION, timeout_s: float = DEFAULT_TIMEOUT_S
) -> DeadLetterReader:
    """What `api.app.create_app(dead_letters=...)` takes: reads the settings' dead-letter topic on each call."""
    if per_partition < 1 or timeout_s <= 0:
        raise ValueError(f"per_partition must be >= 1 and timeout_s > 0 (got {per_partition}, {timeout_s})")
    return lambda: read_dead_letters(settings, per_partition=per_partition, timeout_s=timeout_s)


def read_dead_letters(
    settings: Settings, *, per_partition: int = DEFAULT_PER_PARTITION, timeout_s: float = DEFAULT_TIMEOUT_S
) -> DeadLetters:
    """The last `per_partition` records of each partition of the dead-letter topic, newest first."""
    topic, servers = settings.kafka_dlq_topic, settings.kafka_bootstrap_servers
    deadline = time.monotonic() + timeout_s
    timeout_ms = max(int(timeout_s * 1000), 1)

    def shown(records: list[DeadLetterRow], problem: str | None = None) -> DeadLetters:
        newest_first = sorted(records, key=lambda r: r.timestamp or datetime.min.replace(tzinfo=UTC), reverse=True)
        return DeadLetters(topic, servers, per_partition, tuple(newest_first), problem)

    try:
        consumer = KafkaConsumer(
            bootstrap_servers=servers.split(","),
            group_id=None,  # no group: nothing joined, nothing committed
            enable_auto_commit=False,
            client_id="retrainer-dashboard-dlq",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=max(timeout_ms, 1000),
            fetch_max_wait_ms=100,
        )
    except KafkaError as err:
        return shown([], f"Kafka at {servers} did not answer within {timeout_s:g} s ({err}); start the broker "
                         "or set RETRAINER_KAFKA_BOOTSTRAP_SERVERS")  # fmt: skip
    records: list[DeadLetterRow] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return shown([], f"the dead-letter topic {topic} does not exist yet: no event has been dead-lettered "
                             "(RETRAINER_KAFKA_TOPIC or RETRAINER_KAFKA_DLQ_TOPIC names it)")  # fmt: skip
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        ends = consumer.end_offsets(assigned, timeout_ms=timeout_ms)
        begins = consumer.beginning_offsets(assigned, timeout_ms=timeout_ms)
        pending = {}
        for partition in assigned:
            start = max(begins[partition], ends[partition] - per_partition)
            consumer.seek(partition, start)
            if start < ends[partition]:
                pending[partition] = ends[partition]
        while pending:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return shown(
                    records, f"read {len(records)} record(s) before the {timeout_s:g} s limit; reload for more"
                )
            for partition, batch in consumer.poll(timeout_ms=min(left_ms, 500)).items():
                end = pending.get(partition)
                records += [_row(record) for record in batch if end is not None and record.offset < end]
                if end is not None and consumer.position(partition) >= end:
                    del pending[partition]
        return shown(records)
    except KafkaError as err:
        return shown(records, f"reading {topic} from Kafka at {servers} failed ({err}); reload to try again")
    finally:
        consumer.close(autocommit=False)


def _row(record: Any) -> DeadLetterRow:
    headers = {name: value for name, value in (record.headers or [])}

    def header(name: str) -> str | None:
        value = headers.get(name)
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else None

    original = header("retrainer-original-topic")
    if original is not None:
        original += f"[{header('retrainer-original-partition')}]@{header('retrainer-original-offset')}"
    value = record.value or b""
    return DeadLetterRow(
        partition=record.partition,
        offset=record.offset,
        timestamp=datetime.fromtimestamp(record.timestamp / 1000, UTC)
        if record.timestamp and record.timestamp > 0
        else None,
        key=record.key.decode("utf-8", errors="replace") if isinstance(record.key, bytes) else None,
        error=header(ERROR_HEADER) or f"(no {ERROR_HEADER} header)",
        original=original,
        value_preview=value[:PREVIEW_BYTES].decode("utf-8", errors="replace"),
        value_bytes=len(value),
    )
