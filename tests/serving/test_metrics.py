"""Per-variant serving metrics (`serving.metrics.ServingMetrics`): the Prometheus series and the windows."""

from __future__ import annotations

from prometheus_client import generate_latest

from serving.metrics import ServingMetrics

LABELS = 'pipeline="digits",variant="canary",version="2"'


def test_every_request_counts_in_prometheus_and_in_its_window() -> None:
    metrics = ServingMetrics()
    metrics.observe("digits", "canary", "2", 0.002, [3])
    metrics.observe("digits", "canary", "2", 0.004, [1, 3, 3, 0])  # one request, four rows
    metrics.failed("digits", "canary", "2", 0.001)
    metrics.rejected("digits", "canary", "2")
    metrics.observe("digits", "champion", "1", 0.001, [])

    text = generate_latest(metrics.registry).decode()
    assert f"retrainer_serving_requests_total{{{LABELS}}} 3.0" in text
    assert f'retrainer_serving_errors_total{{kind="server",{LABELS}}} 1.0' in text
    assert f'retrainer_serving_errors_total{{kind="client",{LABELS}}} 1.0' in text
    assert f"retrainer_serving_request_latency_seconds_count{{{LABELS}}} 2.0" in text
    for cls, count in (("0", 1), ("1", 1), ("3", 3)):
        assert f'retrainer_serving_predictions_total{{class="{cls}",{LABELS}}} {count}.0' in text
    assert 'retrainer_serving_requests_total{pipeline="digits",variant="champion",version="1"} 1.0' in text

    canary = next(w for w in metrics.snapshot("digits") if w.variant == "canary")
    assert (canary.requests, canary.errors, canary.rejected) == (3, 1, 1)
    assert canary.class_counts == {"0": 1, "1": 1, "3": 3}
