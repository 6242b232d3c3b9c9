"""Prometheus metrics shared by the consumer, the trigger service and the API (`GET /metrics`).

Defined once here (a layer both consumers/ and api/ may import) so every process registers the
same names. Labels are low-cardinality by design: no event ids, no run ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter("retrainer_events_consumed_total", "Records read from the data-change topic", ["topic"])
EVENTS_INVALID = Counter("retrainer_events_invalid_total", "Records refused as invalid, by reason", ["reason"])
EVENTS_DEAD_LETTERED = Counter("retrainer_events_dead_lettered_total", "Records written to the dead-letter topic")
EVENTS_DUPLICATE = Counter("retrainer_events_duplicate_total", "Valid events whose id was already in the inbox")
CONSUMER_LAG = Gauge("retrainer_consumer_lag", "Records behind the end of the partition", ["topic", "partition"])
RUNS_CREATED = Counter("retrainer_runs_created_total", "Runs created, by trigger kind", ["trigger"])
TRIGGER_LATENCY = Histogram(
    "retrainer_trigger_latency_seconds",
    "From an event's arrival in the inbox to its run's creation",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
