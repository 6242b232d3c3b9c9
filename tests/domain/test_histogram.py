"""LatencyHistogram: fixed log buckets, merging by counts, quantiles, bounds and JSON round-trip."""

from __future__ import annotations

import math
import random

import pytest
from pydantic import ValidationError

from domain.histogram import (
    LAST_BUCKET,
    SMALLEST_MS,
    LatencyHistogram,
    bucket_bounds,
    bucket_index,
)


@pytest.mark.parametrize("ms", [0.0, SMALLEST_MS, 0.0015, 0.9, 1.0, 2.0, 37.5, 1234.0, 9e6])
def test_each_latency_lies_in_its_bucket(ms: float) -> None:
    low, high = bucket_bounds(bucket_index(ms))
    assert low <= ms <= high
    if 0 < bucket_index(ms) < LAST_BUCKET:
        assert high / low == pytest.approx(2 ** (1 / 16))


def test_a_negative_latency_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        bucket_index(-1.0)


def test_merging_adds_counts_like_concatenating_the_samples() -> None:
    rng = random.Random(3)  # noqa: S311 - reproducible latencies, not a secret
    a = [rng.lognormvariate(0.7, 0.4) for _ in range(500)]
    b = [rng.lognormvariate(1.0, 0.2) for _ in range(300)]
    merged = LatencyHistogram.of(a).merged(LatencyHistogram.of(b))
    assert merged == LatencyHistogram.of(a + b)
    assert merged.total == 800


def test_quantiles_are_within_the_bucket_width_of_the_samples() -> None:
    rng = random.Random(5)  # noqa: S311 - reproducible latencies, not a secret
    values = sorted(rng.lognormvariate(1.0, 0.5) for _ in range(10_000))
    histogram = LatencyHistogram.of(values)
    for q in (0.5, 0.9, 0.99):
        exact = values[math.ceil(q * len(values)) - 1]
        estimate = histogram.quantile(q)
        assert estimate is not None
        assert abs(estimate / exact - 1) < 0.023


def test_an_empty_histogram_has_no_quantile() -> None:
    assert LatencyHistogram().quantile(0.99) is None
    assert LatencyHistogram().total == 0


def test_bounds_are_conservative_on_either_side() -> None:
    histogram = LatencyHistogram.of([1.0, 2.0, 2.01, 5.0])
    # 2.0 and 2.01 share a bucket: certainly above 2.005 is only 5.0, possibly above it are three.
    assert histogram.count_above(2.005) == 1
    assert histogram.count_at_least_possibly(2.005) == 3
    low, high = histogram.order_statistic(4)
    assert low < 5.0 <= high
    with pytest.raises(ValueError, match="does not exist"):
        histogram.order_statistic(5)


def test_json_round_trip_keeps_the_counts() -> None:
    histogram = LatencyHistogram.of([0.5, 0.5, 3.0, 80.0])
    text = histogram.model_dump_json()
    assert LatencyHistogram.model_validate_json(text) == histogram


def test_a_histogram_of_another_layout_is_refused_with_the_fix() -> None:
    with pytest.raises(ValidationError, match="bucket_index"):
        LatencyHistogram(counts={LAST_BUCKET + 1: 3})
    with pytest.raises(ValidationError, match="negative count"):
        LatencyHistogram(counts={10: -1})


def test_empty_buckets_are_not_stored() -> None:
    assert LatencyHistogram(counts={10: 0, 11: 2}).counts == {11: 2}
