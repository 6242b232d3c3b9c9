"""A bounded load generator for the model server: live traffic for canary rollouts in the demo and
the tests.

`Traffic` sends Open Inference Protocol v2 infer requests from `clients` threads (one keep-alive
HTTP connection each), cycling through the given rows, optionally at most `rate_per_second` in
total, until stopped. With labels it also sends the delayed label of a fraction of the answers to
the feedback endpoint, as a labelling team would: class ids for a classifier, float targets for a
regression model. It counts what came back per served version. `api_key` goes with every request
(X-API-Key): feedback needs a `feedback` key, and inference an `infer` key where the server requires one.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class TrafficStats:
    sent: int = 0
    failed: int = 0  # HTTP status >= 500 or no answer
    refused: int = 0  # HTTP 4xx
    labelled: int = 0
    by_version: Counter[str] = field(default_factory=Counter)


class Traffic:
    def __init__(
        self,
        base_url: str,
        pipeline: str,
        rows: np.ndarray,
        *,
        labels: np.ndarray | None = None,
        feedback_fraction: float = 0.0,
        clients: int = 4,
        rate_per_second: float | None = None,
        rows_per_request: int = 1,
        seed: int = 0,
        api_key: str | None = None,
    ) -> None:
        if rows.ndim < 2 or len(rows) == 0:
            raise ValueError("Traffic needs a non-empty 2-D (or more) array of input rows")
        self.base_url, self.pipeline = base_url.rstrip("/"), pipeline
        self.rows, self.labels = rows.astype(np.float32), labels
        self.feedback_fraction = feedback_fraction if labels is not None else 0.0
        self.clients, self.rate, self.rows_per_request = clients, rate_per_second, rows_per_request
        self.stats = TrafficStats()
        self._seed = seed
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Traffic:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"traffic-{i}", daemon=True)
            for i in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> TrafficStats:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        return self.stats

    def _client(self, index: int) -> None:
        rng = np.random.default_rng(self._seed + index)
        interval = self.clients / self.rate if self.rate else 0.0
        url = f"/v2/models/{self.pipeline}/infer"
        with httpx.Client(base_url=self.base_url, headers=self._headers, timeout=10.0) as http:
            next_at = time.monotonic()
            while not self._stop.is_set():
                picks = rng.integers(0, len(self.rows), size=self.rows_per_request)
                batch = self.rows[picks]
                request_id = uuid.uuid4().hex
                body = {
                    "id": request_id,
                    "inputs": [
                        {
                            "name": "input",
                            "shape": list(batch.shape),
                            "datatype": "FP32",
                            "data": batch.ravel().tolist(),
                        }
                    ],
                }
                try:
                    response = http.post(url, json=body)
                except httpx.HTTPError:
                    self._count(failed=1)
                else:
                    if response.status_code == 200:
                        version = str(response.json().get("model_version"))
                        self._count(version=version)
                        if self.labels is not None and rng.random() < self.feedback_fraction:
                            # class ids stay ints, regression targets floats (a list per row for several outputs)
                            label = self.labels[picks].tolist()
                            sent = http.post(
                                f"/v2/models/{self.pipeline}/feedback",
                                json={"request_id": request_id, "label": label if len(label) > 1 else label[0]},
                            )
                            if sent.status_code == 200:
                                self._count(labelled=1)
                    elif response.status_code >= 500:
                        self._count(failed=1)
                    else:
                        self._count(refused=1)
                if interval:
                    next_at += interval
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    else:
                        next_at = time.monotonic()

    def _count(self, *, version: str | None = None, failed: int = 0, labelled: int = 0, refused: int = 0) -> None:
        with self._lock:
            self.stats.sent += 1 if labelled == 0 else 0
            self.stats.failed += failed
            self.stats.refused += refused
            self.stats.labelled += labelled
            if version is not None:
                self.stats.by_version[version] += 1


@contextmanager
def traffic(base_url: str, pipeline: str, rows: np.ndarray, **options: object) -> Iterator[Traffic]:
    """Runs `Traffic(...)` for the duration of the block."""
    generator = Traffic(base_url, pipeline, rows, **options)  # type: ignore[arg-type]
    generator.start()
    try:
        yield generator
    finally:
        generator.stop()
