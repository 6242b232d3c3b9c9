"""Windows of several replicas merge by adding counts; percentiles come from the merged histogram."""

from __future__ import annotations

import pytest

from domain.evidence import VariantWindow
from domain.histogram import LatencyHistogram


def _window(latencies: list[float], **counts: int) -> VariantWindow:
    histogram = LatencyHistogram.of(latencies)
    return VariantWindow(
        version="2", requests=len(latencies), latency_histogram=histogram,
        latency_p50_ms=histogram.quantile(0.5), latency_p99_ms=histogram.quantile(0.99), **counts,
    )  # fmt: skip


def test_merged_windows_add_counts_and_read_p99_from_the_merged_histogram_not_an_average() -> None:
    fast = _window([1.0] * 99, errors=1, labelled=10, correct=9)
    slow = _window([100.0], labelled=2, correct=1)

    total = fast.merged(slow)

    assert (total.requests, total.errors, total.labelled, total.correct) == (100, 1, 12, 10)
    assert total.latency_histogram == LatencyHistogram.of([1.0] * 99 + [100.0])
    # the 99th of 100 samples is a fast one; averaging the replicas' p99s would say about 50 ms
    assert total.latency_p99_ms == pytest.approx(1.0, rel=0.03)
    assert total.latency_p50_ms == pytest.approx(1.0, rel=0.03)


def test_merging_class_counts_and_regression_errors_adds_them() -> None:
    a = VariantWindow(version="1", class_counts={"0": 3, "1": 1}, abs_error_sum=1.5, abs_error_sq_sum=2.0)
    b = VariantWindow(version="1", class_counts={"1": 2, "2": 5}, abs_error_sum=0.5, abs_error_sq_sum=0.25)

    total = a.merged(b)

    assert total.class_counts == {"0": 3, "1": 3, "2": 5}
    assert (total.abs_error_sum, total.abs_error_sq_sum) == (2.0, 2.25)
    assert total.latency_histogram is None and total.latency_p99_ms is None
