"""A mergeable latency histogram: fixed log-spaced buckets, so windows add up by adding counts.

Every replica and every window uses the same bucket layout (`BUCKETS_PER_DOUBLING` buckets per
doubling from `SMALLEST_MS`), so the fleet's window for a variant is the plain sum of the replicas'
histograms (`merged`), with no resampling and no loss beyond the bucket width. A bucket is about
4.4 % wide: a quantile read from it is within about 2.2 % of the sample's (the geometric middle of
its bucket), far below what a canary decision cares about.

Bucket `i >= 1` holds latencies in (SMALLEST_MS * g**(i-1), SMALLEST_MS * g**i] with
g = 2 ** (1 / BUCKETS_PER_DOUBLING); bucket 0 holds everything up to SMALLEST_MS (zero included),
the last bucket everything above the largest edge (about 2.5 hours). Only non-empty buckets are
stored: `{"counts": {"412": 7, "413": 1}}` in JSON (pydantic reads the keys back as integers).

Where a test needs bounds rather than an estimate, the histogram gives them: `order_statistic(k)`
is the bucket (low, high] that holds the k-th smallest sample, `count_above(x)` counts only the
samples certainly above `x` (their whole bucket is), `count_at_least_possibly(x)` those that may be.

The model server counts bucket indices (`bucket_index`) as requests are answered and reports
`LatencyHistogram(counts=…)`; tests and the simulation build one with `LatencyHistogram.of(values)`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator

BUCKETS_PER_DOUBLING = 16
SMALLEST_MS = 0.001
LAST_BUCKET = 33 * BUCKETS_PER_DOUBLING  # edges up to 0.001 ms * 2**33, about 8.6e6 ms
_GROWTH_LOG2 = 1.0 / BUCKETS_PER_DOUBLING


def bucket_index(latency_ms: float) -> int:
    """The bucket that holds `latency_ms` (a negative or NaN latency is a bug in the caller)."""
    if not latency_ms >= 0.0:
        raise ValueError(f"a latency is a non-negative number of milliseconds (got {latency_ms})")
    if latency_ms <= SMALLEST_MS:
        return 0
    index = math.ceil(math.log2(latency_ms / SMALLEST_MS) * BUCKETS_PER_DOUBLING - 1e-9)
    return min(max(index, 1), LAST_BUCKET)


def bucket_bounds(index: int) -> tuple[float, float]:
    """(low, high] of a bucket in ms; bucket 0 is [0, SMALLEST_MS], the last one ends at infinity."""
    if index <= 0:
        return 0.0, SMALLEST_MS
    high = math.inf if index >= LAST_BUCKET else SMALLEST_MS * 2.0 ** (index * _GROWTH_LOG2)
    return SMALLEST_MS * 2.0 ** ((index - 1) * _GROWTH_LOG2), high


def bucket_middle(index: int) -> float:
    """A bucket's representative latency: the geometric middle of its edges."""
    low, high = bucket_bounds(index)
    if index <= 0:
        return 0.0
    if math.isinf(high):
        return low
    return math.sqrt(low * high)


class LatencyHistogram(BaseModel):
    """Latencies of one window (or of several merged), as counts per fixed bucket."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    counts: dict[int, int] = Field(
        default_factory=dict, description="Samples per bucket index (see domain/histogram.py); empty buckets omitted."
    )

    @field_validator("counts")
    @classmethod
    def _valid_counts(cls, counts: dict[int, int]) -> dict[int, int]:
        for index, count in counts.items():
            if not 0 <= index <= LAST_BUCKET:
                raise ValueError(
                    f"bucket {index} is outside 0..{LAST_BUCKET}: the histogram was built with another "
                    "layout; rebuild it with domain.histogram.bucket_index"
                )
            if count < 0:
                raise ValueError(f"bucket {index} has a negative count ({count}); counts are sample numbers")
        return {index: count for index, count in sorted(counts.items()) if count}

    @classmethod
    def of(cls, latencies_ms: Iterable[float]) -> LatencyHistogram:
        return cls(counts=dict(Counter(bucket_index(x) for x in latencies_ms)))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merged(self, *others: LatencyHistogram) -> LatencyHistogram:
        """The histogram of all these windows' samples together (replicas, or consecutive windows)."""
        total = Counter(self.counts)
        for other in others:
            total.update(other.counts)
        return LatencyHistogram(counts=dict(total))

    def order_statistic(self, k: int) -> tuple[float, float]:
        """The bucket (low, high] holding the k-th smallest sample (1-based)."""
        if not 1 <= k <= self.total:
            raise ValueError(f"order statistic {k} does not exist in a histogram of {self.total} samples")
        seen = 0
        for index, count in self.counts.items():
            seen += count
            if seen >= k:
                return bucket_bounds(index)
        raise AssertionError("unreachable: k <= total")

    def quantile(self, q: float) -> float | None:
        """The q-quantile estimate (nearest rank, bucket middle); None for an empty histogram."""
        if not 0.0 < q <= 1.0:
            raise ValueError(f"a quantile lies in (0, 1] (got {q})")
        n = self.total
        if n == 0:
            return None
        rank, seen = max(1, math.ceil(q * n)), 0
        for index, count in self.counts.items():
            seen += count
            if seen >= rank:
                return bucket_middle(index)
        raise AssertionError("unreachable: rank <= total")

    def count_above(self, threshold_ms: float) -> int:
        """Samples certainly above `threshold_ms`: their whole bucket lies above it."""
        return sum(count for index, count in self.counts.items() if bucket_bounds(index)[0] >= threshold_ms)

    def count_at_least_possibly(self, threshold_ms: float) -> int:
        """Samples that may be above `threshold_ms`: their bucket reaches past it."""
        return sum(count for index, count in self.counts.items() if bucket_bounds(index)[1] > threshold_ms)
