"""Per-variant serving metrics, for Prometheus and for the canary controller in the same process.

Prometheus (`/metrics`, labels pipeline, variant, version): `retrainer_serving_requests_total`,
`retrainer_serving_errors_total` (kind: `client` for refused input, `server` for a failed
forward pass), `retrainer_serving_request_latency_seconds` (histogram),
`retrainer_serving_predictions_total` (class), `retrainer_serving_feedback_total` (correct), and
from the loaded models themselves `retrainer_serving_forward_passes_total` and
`retrainer_serving_forward_rows_total` (their ratio is the mean batch size).

`ServingMetrics.snapshot(pipeline, window_s)` gives per (variant, version) a
`domain.evidence.ServedWindow`: requests, errors, p50/p99 latency and the window's latencies as a
mergeable histogram (`domain.histogram`: what the canary's latency test reads), predicted-class counts and
labelled rows over the last `window_s` seconds, from bounded in-memory event windows (no
Prometheus scrape needed). The stats endpoint answers them to the canary controller.

Delayed labels: `FeedbackStore` remembers the predicted classes of the last `capacity` requests
(LRU by request id); a label sent later is scored against the prediction of the variant that
actually served the request.
"""

from __future__ import annotations

import collections
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from domain.errors import InvalidInputError, NotFoundError
from domain.evidence import ServedWindow
from domain.histogram import LatencyHistogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LABELS = ("pipeline", "variant", "version")
WINDOW_EVENTS = 50_000  # per (pipeline, variant, version): enough for minutes at hundreds of req/s

Clock = Callable[[], float]


@dataclass(slots=True)
class _Window:
    # (time, latency seconds, ok, predicted classes); (time, rejected); (time, labelled, correct)
    served: deque[tuple[float, float, bool, tuple[int, ...]]] = field(
        default_factory=lambda: deque(maxlen=WINDOW_EVENTS)
    )
    rejected: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW_EVENTS))
    feedback: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=WINDOW_EVENTS))


class ServingMetrics:
    """Prometheus collectors in their own registry (one per app) plus the controller's windows."""

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, documentation: str, *extra: str) -> Counter:
            return Counter(name, documentation, (*LABELS, *extra), registry=self.registry)

        self.requests = counter("retrainer_serving_requests", "Inference requests answered.")
        self.errors = counter(
            "retrainer_serving_errors",
            "Inference requests that failed (kind=client: refused input; kind=server: the model failed).",
            "kind",
        )
        self.latency = Histogram(
            "retrainer_serving_request_latency_seconds",
            "Time from a parsed request to its answer, batching wait included.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = counter("retrainer_serving_predictions", "Predicted classes, one per row.", "class")
        self.feedback = counter(
            "retrainer_serving_feedback", "Delayed labels received, by whether the prediction was right.", "correct"
        )
        self._clock = clock
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._lock = threading.Lock()

    def _window(self, key: tuple[str, str, str]) -> _Window:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        return window

    def observe(self, pipeline: str, variant: str, version: str, latency_s: float, classes: Sequence[int]) -> None:
        self.requests.labels(pipeline, variant, version).inc()
        self.latency.labels(pipeline, variant, version).observe(latency_s)
        counts = np.bincount(np.asarray(classes, dtype=np.int64)) if len(classes) else np.zeros(0, dtype=np.int64)
        for cls, count in enumerate(counts.tolist()):
            if count:
                self.predictions.labels(pipeline, variant, version, str(cls)).inc(count)
        with self._lock:
            self._window((pipeline, variant, version)).served.append((self._clock(), latency_s, True, tuple(classes)))

    def failed(self, pipeline: str, variant: str, version: str, latency_s: float) -> None:
        self.requests.labels(pipeline, variant, version).inc()
        self.errors.labels(pipeline, variant, version, "server").inc()
        with self._lock:
            self._window((pipeline, variant, version)).served.append((self._clock(), latency_s, False, ()))

    def rejected(self, pipeline: str, variant: str, version: str) -> None:
        self.errors.labels(pipeline, variant, version, "client").inc()
        with self._lock:
            self._window((pipeline, variant, version)).rejected.append(self._clock())

    def labelled(self, pipeline: str, variant: str, version: str, labels: int, correct: int) -> None:
        self.feedback.labels(pipeline, variant, version, "true").inc(correct)
        self.feedback.labels(pipeline, variant, version, "false").inc(labels - correct)
        with self._lock:
            self._window((pipeline, variant, version)).feedback.append((self._clock(), labels, correct))

    def snapshot(self, pipeline: str, window_s: float = 60.0) -> list[ServedWindow]:
        """Windows per (variant, version) seen in the last `window_s` seconds, champion first."""
        since = self._clock() - window_s
        with self._lock:
            items = [(key, window) for key, window in self._windows.items() if key[0] == pipeline]
            copies = [
                (key, [e for e in w.served if e[0] >= since], sum(1 for t in w.rejected if t >= since),
                 [f for f in w.feedback if f[0] >= since])
                for key, w in items
            ]  # fmt: skip
        windows = [
            _served_window(key, served, rejected, feedback)
            for key, served, rejected, feedback in copies
            if served or rejected or feedback
        ]
        windows.sort(key=lambda w: (w.variant != "champion", w.version))
        return windows


def _served_window(
    key: tuple[str, str, str],
    served: list[tuple[float, float, bool, tuple[int, ...]]],
    rejected: int,
    feedback: list[tuple[float, int, int]],
) -> ServedWindow:
    pipeline, variant, version = key
    latencies = np.asarray([e[1] for e in served], dtype=np.float64) * 1000.0
    p50, p99 = (float(v) for v in np.percentile(latencies, (50, 99))) if latencies.size else (None, None)
    classes = collections.Counter(cls for event in served for cls in event[3])
    return ServedWindow.model_validate(
        {
            "pipeline": pipeline,
            "variant": variant,
            "version": version,
            "requests": len(served),
            "errors": sum(1 for e in served if not e[2]),
            "rejected": rejected,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "latency_histogram": LatencyHistogram.of(latencies.tolist()),
            "class_counts": {str(cls): classes[cls] for cls in sorted(classes)},
            "labelled": sum(f[1] for f in feedback),
            "correct": sum(f[2] for f in feedback),
        }
    )


class Prediction(NamedTuple):
    """What was answered to one request: by which variant and version, and the predicted classes."""

    pipeline: str
    variant: str
    version: str
    classes: tuple[int, ...]
    output_classes: int


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    prediction: Prediction
    labels: int
    correct: int


class FeedbackStore:
    """The predictions of the last `capacity` requests, by (pipeline, request id), least recent evicted."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"FeedbackStore capacity must be >= 1 (got {capacity})")
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], Prediction] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, request_id: str, prediction: Prediction) -> None:
        key = (prediction.pipeline, request_id)
        with self._lock:
            self._items[key] = prediction
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def label(self, pipeline: str, request_id: str, labels: int | Sequence[int]) -> FeedbackResult:
        """Scores the label(s) against the stored prediction, once: the entry is consumed.

        NotFoundError if the request id is unknown, expired from the LRU or already labelled;
        InvalidInputError (entry kept) if the labels do not fit the prediction.
        """
        key = (pipeline, request_id)
        with self._lock:
            prediction = self._items.get(key)
            if prediction is None:
                raise NotFoundError(
                    f"feedback.request_id {request_id!r}: no prediction of model {pipeline!r} is remembered under "
                    f"that id (unknown, already labelled, or older than the last {self.capacity} requests)"
                )
            values = [labels] if isinstance(labels, int) else list(labels)
            if len(values) != len(prediction.classes):
                raise InvalidInputError(
                    f"feedback.label: request {request_id!r} had {len(prediction.classes)} row(s); send one integer "
                    f"label per row ({len(values)} given)"
                )
            bad = [v for v in values if not 0 <= v < prediction.output_classes]
            if bad:
                raise InvalidInputError(
                    f"feedback.label: {bad[0]} is not a class id of model {pipeline!r}; "
                    f"use 0..{prediction.output_classes - 1}"
                )
            del self._items[key]
        correct = sum(int(v == c) for v, c in zip(values, prediction.classes, strict=True))
        return FeedbackResult(prediction, len(values), correct)
