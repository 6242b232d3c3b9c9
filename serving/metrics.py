"""Per-variant serving metrics, for Prometheus and for the canary controller in the same process.

Prometheus (`/metrics`, labels pipeline, variant, version): `retrainer_serving_requests_total`,
`retrainer_serving_errors_total` (kind: `client` for refused input, `server` for a failed
forward pass), `retrainer_serving_request_latency_seconds` (histogram),
`retrainer_serving_predictions_total` (class: a classifier's class id, or a regression model's
bin index among the champion's prediction bins), `retrainer_serving_feedback_total` (correct: true,
false, or n/a for a regression label), `retrainer_serving_feedback_abs_error_total` (regression: the
summed absolute errors, so MAE = it / feedback_total{correct="n/a"}), and from the loaded models
themselves `retrainer_serving_forward_passes_total` and `retrainer_serving_forward_rows_total`
(their ratio is the mean batch size).

`ServingMetrics.snapshot(pipeline, window_s)` gives per (variant, version) a
`domain.evidence.ServedWindow`: requests, errors, p50/p99 latency and the window's latencies as a
mergeable histogram (`domain.histogram`: what the canary's latency test reads), predicted-class (or
regression bin) counts and labelled rows (right answers, or a regression model's summed absolute
errors and their squares) over the last `window_s` seconds, from bounded in-memory event windows (no
Prometheus scrape needed). The stats endpoint answers them to the canary controller. `take_report()`
gives the same windows for the events since its previous call: what a replica writes to the metadata
database (`serving/reports.py`) so the controller sums every replica's traffic.

Delayed labels: `FeedbackStore` remembers the predictions of the last `capacity` requests (LRU by
request id); a label sent later is scored against the prediction of the variant that actually
served the request: a class id per row for a classifier (right or wrong), a number per row (a list
of `outputs` numbers per row for several outputs) for a regression model, whose absolute error (the
mean over outputs) is summed.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from domain.errors import InvalidInputError, NotFoundError
from domain.evidence import ServedWindow
from domain.histogram import LatencyHistogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LABELS = ("pipeline", "variant", "version")
WINDOW_EVENTS = 50_000  # per (pipeline, variant, version): enough for minutes at hundreds of req/s

Clock = Callable[[], float]
M = TypeVar("M", bound=MetricWrapperBase)


@dataclass(slots=True)
class _Window:
    # (time, latency seconds, ok, predicted classes or bins); (time, rejected);
    # (time, labelled, correct, sum of |error|, sum of |error|^2)
    served: deque[tuple[float, float, bool, tuple[int, ...]]] = field(
        default_factory=lambda: deque(maxlen=WINDOW_EVENTS)
    )
    rejected: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW_EVENTS))
    feedback: deque[tuple[float, int, int, float, float]] = field(default_factory=lambda: deque(maxlen=WINDOW_EVENTS))


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
            "retrainer_serving_feedback",
            "Delayed labels received, by whether the prediction was right (n/a: a regression label).",
            "correct",
        )
        self.abs_error = counter(
            "retrainer_serving_feedback_abs_error", "Regression: absolute errors of labelled rows, summed."
        )
        self._clock = clock
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}
        self._reported_until = -math.inf
        self._lock = threading.Lock()

    def _window(self, key: tuple[str, str, str]) -> _Window:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        return window

    def _child(self, metric: M, labels: tuple[str, ...]) -> M:
        """`metric.labels(*labels)`, resolved once per label set: `labels` takes a lock and builds a
        tuple and a dict lookup per call (~1 µs), and a request counts in three or four series."""
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children.setdefault((metric, labels), metric.labels(*labels))
        return cast(M, child)

    def observe(self, pipeline: str, variant: str, version: str, latency_s: float, classes: Sequence[int]) -> None:
        key = (pipeline, variant, version)
        self._child(self.requests, key).inc()
        self._child(self.latency, key).observe(latency_s)
        for cls, count in ((classes[0], 1),) if len(classes) == 1 else collections.Counter(classes).items():
            self._child(self.predictions, (*key, str(cls))).inc(count)
        with self._lock:
            self._window(key).served.append((self._clock(), latency_s, True, tuple(classes)))

    def failed(self, pipeline: str, variant: str, version: str, latency_s: float) -> None:
        key = (pipeline, variant, version)
        self._child(self.requests, key).inc()
        self._child(self.errors, (*key, "server")).inc()
        with self._lock:
            self._window(key).served.append((self._clock(), latency_s, False, ()))

    def rejected(self, pipeline: str, variant: str, version: str) -> None:
        key = (pipeline, variant, version)
        self._child(self.errors, (*key, "client")).inc()
        with self._lock:
            self._window(key).rejected.append(self._clock())

    def labelled(
        self,
        pipeline: str,
        variant: str,
        version: str,
        labels: int,
        correct: int,
        abs_errors: tuple[float, float] | None = None,
    ) -> None:
        """`labels` rows labelled; a classifier's `correct` of them, or a regression model's
        `abs_errors` (sum of |error|, sum of |error|^2; `correct` 0)."""
        key = (pipeline, variant, version)
        if abs_errors is None:
            self.feedback.labels(*key, "true").inc(correct)
            self.feedback.labels(*key, "false").inc(labels - correct)
            abs_errors = (0.0, 0.0)
        else:
            self.feedback.labels(*key, "n/a").inc(labels)
            self.abs_error.labels(*key).inc(abs_errors[0])
        with self._lock:
            self._window(key).feedback.append((self._clock(), labels, correct, *abs_errors))

    def snapshot(self, pipeline: str, window_s: float = 60.0) -> list[ServedWindow]:
        """Windows per (variant, version) seen in the last `window_s` seconds, champion first."""
        with self._lock:
            now = self._clock()
            return self._between(now - window_s, now, pipeline)

    def take_report(self) -> list[ServedWindow]:
        """Every pipeline's windows since the previous call (the first: since these metrics began).
        Consecutive reports are disjoint in time, so a replica's reports add up without counting an
        event twice (`serving/reports.py` stores them for the canary controller)."""
        with self._lock:
            now = self._clock()
            since, self._reported_until = self._reported_until, now
            return self._between(since, now, None, inclusive_start=False)

    def _between(
        self, since: float, until: float, pipeline: str | None, *, inclusive_start: bool = True
    ) -> list[ServedWindow]:
        """Windows of events in [since, until] ((since, until] when not `inclusive_start`); the lock is held."""

        def inside(t: float) -> bool:
            return (t >= since if inclusive_start else t > since) and t <= until

        copies = [
            (key, [e for e in w.served if inside(e[0])], sum(1 for t in w.rejected if inside(t)),
             [f for f in w.feedback if inside(f[0])])
            for key, w in self._windows.items()
            if pipeline is None or key[0] == pipeline
        ]  # fmt: skip
        windows = [
            _served_window(key, served, rejected, feedback)
            for key, served, rejected, feedback in copies
            if served or rejected or feedback
        ]
        windows.sort(key=lambda w: (w.pipeline, w.variant != "champion", w.version))
        return windows


def _served_window(
    key: tuple[str, str, str],
    served: list[tuple[float, float, bool, tuple[int, ...]]],
    rejected: int,
    feedback: list[tuple[float, int, int, float, float]],
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
            "abs_error_sum": math.fsum(f[3] for f in feedback),
            "abs_error_sq_sum": math.fsum(f[4] for f in feedback),
        }
    )


class Prediction(NamedTuple):
    """What was answered to one request: by which variant and version, and its predictions: a
    classifier's classes (of `output_classes`), or a regression model's `values` (one tuple of
    `output_classes` = outputs floats per row, in the target's units; `classes` then empty)."""

    pipeline: str
    variant: str
    version: str
    classes: tuple[int, ...]
    output_classes: int
    values: tuple[tuple[float, ...], ...] | None = None

    @property
    def rows(self) -> int:
        return len(self.classes) if self.values is None else len(self.values)


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    """A label scored: rows labelled, a classifier's right answers, or a regression model's summed
    absolute errors (per row the mean over outputs) and their squares (None for a classifier)."""

    prediction: Prediction
    labels: int
    correct: int
    abs_errors: tuple[float, float] | None = None


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

    def label(self, pipeline: str, request_id: str, labels: Any) -> FeedbackResult:
        """Scores the label(s) against the stored prediction, once: the entry is consumed.

        A classifier takes a class id, or a list with one per row; a regression model a number per
        row (a lone number for one row), or per row a list of its outputs' numbers.
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
            if prediction.values is None:
                result = _score_classes(prediction, request_id, labels)
            else:
                result = _score_values(prediction, prediction.values, request_id, labels)
            del self._items[key]
        return result


def is_label(value: Any) -> bool:
    """Whether `value` has a label's shape for some model: a number, or a non-empty list of numbers
    or of non-empty lists of numbers (which ones fit is `FeedbackStore.label`'s question)."""
    if _is_number(value):
        return True
    rows = value if isinstance(value, list) and value else None
    return rows is not None and (
        all(_is_number(v) for v in rows) or all(isinstance(r, list) and r and all(map(_is_number, r)) for r in rows)
    )


def _is_class_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _score_classes(prediction: Prediction, request_id: str, labels: Any) -> FeedbackResult:
    values = labels if isinstance(labels, list) else [labels]
    if not values or not all(_is_class_id(v) for v in values):
        wrong = next((v for v in values if not _is_class_id(v)), labels)
        raise InvalidInputError(
            f"feedback.label: {wrong!r} is not a class id; model {prediction.pipeline!r} is a classifier: send an "
            "integer class id, or a list with one per row"
        )
    if len(values) != len(prediction.classes):
        raise InvalidInputError(
            f"feedback.label: request {request_id!r} had {len(prediction.classes)} row(s); send one integer "
            f"label per row ({len(values)} given)"
        )
    bad = [v for v in values if not 0 <= v < prediction.output_classes]
    if bad:
        raise InvalidInputError(
            f"feedback.label: {bad[0]} is not a class id of model {prediction.pipeline!r}; "
            f"use 0..{prediction.output_classes - 1}"
        )
    correct = sum(int(v == c) for v, c in zip(values, prediction.classes, strict=True))
    return FeedbackResult(prediction, len(values), correct)


def _score_values(
    prediction: Prediction, predicted: tuple[tuple[float, ...], ...], request_id: str, labels: Any
) -> FeedbackResult:
    """A regression model's labels against its predictions: rows, sum of per-row mean |error|, sum of squares."""
    outputs, rows = prediction.output_classes, len(predicted)
    shape = "a number per row" if outputs == 1 else f"a list of {outputs} numbers per row (one per output)"
    if _is_number(labels):
        table = [[labels]]
    elif isinstance(labels, list) and labels and all(_is_number(v) for v in labels):
        table = [[v] for v in labels] if outputs == 1 else [labels]  # several outputs: one row, flat
    elif isinstance(labels, list) and labels and all(isinstance(r, list) and all(map(_is_number, r)) for r in labels):
        table = labels
    else:
        raise InvalidInputError(
            f"feedback.label: {labels!r} is not a regression label; model {prediction.pipeline!r} predicts "
            f"{outputs} float(s) per row: send {shape}"
        )
    if len(table) != rows:
        raise InvalidInputError(
            f"feedback.label: request {request_id!r} had {rows} row(s); send {shape} ({len(table)} given)"
        )
    widths = {len(row) for row in table}
    if widths != {outputs}:
        raise InvalidInputError(
            f"feedback.label: rows of {sorted(widths)} value(s) for a model with {outputs} output(s); send {shape}"
        )
    truth = np.asarray(table, dtype=np.float64)
    if not np.isfinite(truth).all():
        raise InvalidInputError("feedback.label: holds NaN or infinity; send finite numbers")
    errors = np.abs(np.asarray(predicted, dtype=np.float64) - truth).mean(axis=1)
    return FeedbackResult(prediction, rows, 0, (float(errors.sum()), float((errors**2).sum())))
