"""A model-server replica reporting to the metadata database: its heartbeat, what it serves, and
its canary windows, so every controller sees the whole fleet without a list of addresses.

`ReplicaReporter.report()` writes, in one transaction (`storage.repositories.replicas`):
- the replica's row in `serving_replicas`: heartbeat, address, and per pipeline the champion
  version, canary version and weight, and since when it serves exactly that;
- with metrics attached (`attach`, which `serving.app.create_serving_app` does), one
  `replica_windows` row per variant it served since its previous report (`ServingMetrics.take_report`).
  Reports are disjoint slices of time, so the controller (`flows/fleet.py`) sums them without
  counting a request twice. Windows a failed write could not store are kept and go with the next.

It runs every `interval_s` seconds in a thread of its own (`start`); `stop` writes a last report
marked stopped, so a replica shut down on purpose is not named missing. One that is killed simply
goes silent: the controller names it missing once its heartbeat is a few intervals old.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from domain.evidence import ReplicaServing, ServedWindow, ServingReplica
from serving.metrics import ServingMetrics
from serving.registry import ModelRegistry
from storage import repositories as repo
from storage.db import transaction

log = logging.getLogger("retrainer.serving.reports")

KEEP_WINDOWS = timedelta(days=1)  # no canary step looks further back
PRUNE_EVERY = 600  # reports between two prunes of this replica's old windows


def default_replica_id() -> str:
    """Host name (a pod's name on Kubernetes), process id and a random suffix: unique per server."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ReplicaReporter:
    """Reports one replica (`registry`, and `metrics` once attached) to the metadata database."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        registry: ModelRegistry,
        *,
        replica_id: str | None = None,
        interval_s: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"the replica report interval must be > 0 seconds (got {interval_s})")
        self.sessions, self.registry, self.interval_s, self._clock = sessions, registry, interval_s, clock
        self.replica_id = replica_id or default_replica_id()
        self.address: str | None = None
        self.metrics: ServingMetrics | None = None
        self.started_at = clock()
        self._window_start = self.started_at
        self._pending: list[ServedWindow] = []
        self._seq = 0
        self._serving: dict[str, ReplicaServing] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, metrics: ServingMetrics, address: str | None = None) -> None:
        """From now on, report `metrics`' windows too (and the server's address, when known)."""
        self.metrics = metrics
        if address is not None:
            self.address = address

    def serving(self) -> dict[str, ReplicaServing]:
        """What the registry serves now per pipeline, with since when it serves exactly that."""
        now = self._clock()
        served: dict[str, ReplicaServing] = {}
        for name in self.registry.pipelines():
            state = self.registry.state(name)
            current = ReplicaServing(
                champion_version=state.champion.version if state.champion else None,
                canary_version=state.canary.version if state.canary else None,
                canary_weight=state.canary_weight if state.canary else 0.0,
            )
            before = self._serving.get(name)
            same = before is not None and before.model_copy(update={"since": None}) == current
            served[name] = before if same and before is not None else current.model_copy(update={"since": now})
        self._serving = served
        return served

    def report(self, *, stopped: bool = False) -> None:
        """One report; raises what the database raised (the windows stay for the next report)."""
        with self._lock:
            if self.metrics is not None:
                self._pending.extend(self.metrics.take_report())
            now = self._clock()
            replica = ServingReplica(
                replica=self.replica_id,
                address=self.address,
                started_at=self.started_at,
                heartbeat_at=now,
                stopped_at=now if stopped else None,
                reports_windows=self.metrics is not None,
                serving=self.serving(),
            )
            self._seq += 1
            with transaction(self.sessions) as session:
                repo.report_replica(
                    session, replica, seq=self._seq, window_start=self._window_start, windows=_summed(self._pending)
                )
                if self._seq % PRUNE_EVERY == 0:
                    repo.prune_replica_windows(session, self.replica_id, now - KEEP_WINDOWS)
            self._pending, self._window_start = [], now

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.report()
                except Exception:  # a database hiccup must not end the reports; the next one carries the windows
                    log.exception("replica %s could not report to the metadata database; retrying", self.replica_id)

        self.report_quietly()
        self._thread = threading.Thread(target=loop, name="retrainer-replica-reporter", daemon=True)
        self._thread.start()

    def report_quietly(self, *, stopped: bool = False) -> None:
        try:
            self.report(stopped=stopped)
        except Exception:
            log.exception("replica %s could not report to the metadata database", self.replica_id)

    def stop(self, *, final_report: bool = True) -> None:
        """Ends the reports; `final_report` writes the last windows and marks the replica stopped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if final_report:
            self.report_quietly(stopped=True)


def _summed(windows: list[ServedWindow]) -> list[ServedWindow]:
    """One window per (pipeline, variant, version): reports a failed write left behind join the next."""
    totals: dict[tuple[str, str, str | None], ServedWindow] = {}
    for window in windows:
        key = (window.pipeline, window.variant, window.version)
        before = totals.get(key)
        totals[key] = window if before is None else before.merged_served(window)
    return list(totals.values())
