"""Prometheus metrics of the data-change consumer, updated by `consumers/consumer.py` and exported
by whichever process runs it (`retrainer consume` and `retrainer serve` on their /metrics).

Labels are low-cardinality by design: no event ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

EVENTS_CONSUMED = Counter("retrainer_events_consumed_total", "Records read from the data-change topic", ["topic"])
EVENTS_INVALID = Counter("retrainer_events_invalid_total", "Records refused as invalid, by reason", ["reason"])
EVENTS_DEAD_LETTERED = Counter("retrainer_events_dead_lettered_total", "Records written to the dead-letter topic")
EVENTS_DUPLICATE = Counter("retrainer_events_duplicate_total", "Valid events whose id was already in the inbox")
CONSUMER_LAG = Gauge("retrainer_consumer_lag", "Records behind the end of the partition", ["topic", "partition"])
PARTITIONS_ASSIGNED = Gauge("retrainer_consumer_partitions_assigned", "Partitions of the topic assigned", ["topic"])
