"""Keeps the model server's registry in step with the metadata database.

`sync_from_metadata` loads each registered pipeline's champion, and the candidate of an active
rollout as its canary, whenever they differ from what is in memory; every artifact is digest-
verified on the way in (`load_version`). A version that cannot be loaded is reported and the
model already serving stays (fail closed: never swap in something unverified). The canary's
traffic share is the rollout's stored step, so the controller moves traffic by writing SQL and
a restarted server comes back at the same weight.

`MetadataFollower` keeps the problem of its last pass (the database did not answer, a version
could not be loaded) until a pass succeeds, and `probe` reports it on /healthz: a server that
serves a stale champion is up (/v2/health/ready) but not healthy. Its `reporter`
(`serving/reports.py`) tells the metadata database, every second while started, that this replica is
alive, what it serves, and (once the app attached its metrics) its canary windows.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from domain.errors import RetrainerError, TransientInfraError
from serving.batching import BatchingConfig
from serving.registry import ModelRegistry, load_version
from serving.reports import ReplicaReporter
from storage import repositories as repo
from storage.artifacts.base import ArtifactStore
from storage.db import transaction
from storage.notify import SERVING_CHANNEL, Wakeups

log = logging.getLogger("retrainer.serving.loader")


class StaleModelsError(TransientInfraError, code="models_stale"):
    """The model server could not follow the metadata database (it did not answer, or a champion
    or canary could not be loaded), so what it serves may no longer be what SQL says."""


def sync_from_metadata(
    registry: ModelRegistry,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    *,
    batching: BatchingConfig | None = None,
) -> dict[str, str]:
    """One pass; returns what happened per pipeline ("loaded v3", "unchanged v3", "no champion", an error)."""
    return _sync(registry, sessions, store, batching)[0]


def _sync(
    registry: ModelRegistry,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    batching: BatchingConfig | None,
) -> tuple[dict[str, str], list[str]]:
    """`sync_from_metadata`'s report, and one line per pipeline whose wanted version was not loaded."""
    with transaction(sessions) as session:
        wanted = []
        for pipeline in repo.list_pipelines(session):
            champion = repo.get_champion(session, pipeline.name)
            rollout = repo.active_rollout(session, pipeline.name)
            candidate = repo.get_model_version_by_id(session, rollout.candidate_version_id) if rollout else None
            weight = rollout.traffic_percent if rollout else 0.0
            wanted.append((pipeline.name, champion, candidate, weight))
    report: dict[str, str] = {}
    not_loaded: list[str] = []
    for name, champion, candidate, weight in wanted:
        registry.expect(name)
        state = registry.state(name)
        if champion is None:
            report[name] = "no champion yet"
            continue
        try:
            if state.champion is None or state.champion.version_id != champion.id:
                registry.set_champion(load_version(store, champion, batching=batching))
                report[name] = f"loaded champion v{champion.version}"
            else:
                report[name] = f"unchanged v{champion.version}"
            if candidate is not None and (state.canary is None or state.canary.version_id != candidate.id):
                registry.set_canary(load_version(store, candidate, batching=batching), weight)
                report[name] += f"; canary v{candidate.version} at {weight:g} %"
            elif candidate is not None and state.canary_weight != weight:
                registry.set_canary_weight(name, weight)  # the rollout moved to its next step
                report[name] += f"; canary v{candidate.version} now at {weight:g} %"
            elif candidate is None and state.canary is not None:
                registry.remove_canary(name)  # the rollout ended: all traffic to the champion
                report[name] += "; canary removed"
        except RetrainerError as error:
            log.error("not loading %s: %s", name, error)
            report[name] = f"kept what was serving: {error}"
            not_loaded.append(f"{name}: {error}")
    return report, not_loaded


class MetadataFollower:
    """Runs `sync_from_metadata` for one registry, one pass at a time: every `refresh_seconds` in a
    background thread, and on demand (`sync`, which the model server's load endpoint calls).
    `probe` is its /healthz check, named `name`."""

    name = "model-follower"

    def __init__(
        self,
        registry: ModelRegistry,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        *,
        batching: BatchingConfig | None = None,
        report_seconds: float = 1.0,
    ) -> None:
        self.registry, self._sessions, self._store, self._batching = registry, sessions, store, batching
        self.reporter = ReplicaReporter(sessions, registry, interval_s=report_seconds)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._problem: tuple[float, str] | None = None  # (monotonic time, what) of the last failed pass

    def sync(self) -> dict[str, str]:
        with self._lock:
            try:
                report, not_loaded = _sync(self.registry, self._sessions, self._store, self._batching)
            except Exception as error:
                self._problem = (time.monotonic(), f"the metadata database could not be read ({error})")
                raise
            if not_loaded:
                self._problem = (time.monotonic(), "kept what was serving for " + "; ".join(not_loaded))
            else:
                self._problem = None
            return report

    def probe(self) -> None:
        """Raises StaleModelsError naming the last pass's problem, until a pass succeeds."""
        problem = self._problem
        if problem is not None:
            since, what = problem
            raise StaleModelsError(
                f"models may be stale: {what} ({time.monotonic() - since:.0f} s ago); "
                "the follower retries on every refresh"
            )

    def start(self, refresh_seconds: float) -> None:
        # A champion or rollout move is pushed (storage/notify.py); the refresh is the fallback.
        wakeups = Wakeups(self._sessions, SERVING_CHANNEL)

        def loop() -> None:
            with wakeups:
                while wakeups.next_pass(refresh_seconds, self._stop):
                    try:
                        self.sync()
                    except Exception:  # a database hiccup must not end the follower; the next pass retries
                        log.exception("reloading models from the metadata database failed; retrying")

        self._thread = threading.Thread(target=loop, name="retrainer-model-follower", daemon=True)
        self._thread.start()
        self.reporter.start()

    def stop(self, *, final_report: bool = True) -> None:
        """Stops following and reporting; without `final_report` the replica just goes silent (as if killed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.reporter.stop(final_report=final_report)
