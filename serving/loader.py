"""Keeps the model server's registry in step with the metadata database.

`sync_from_metadata` loads each registered pipeline's champion, and the candidate of an active
rollout as its canary, whenever they differ from what is in memory; every artifact is digest-
verified on the way in (`load_version`). A version that cannot be loaded is reported and the
model already serving stays (fail closed: never swap in something unverified). The canary's
traffic share is the rollout's stored step, so the controller moves traffic by writing SQL and
a restarted server comes back at the same weight.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from domain.errors import RetrainerError
from serving.batching import BatchingConfig
from serving.registry import ModelRegistry, load_version
from storage import repositories as repo
from storage.artifacts.base import ArtifactStore
from storage.db import transaction

log = logging.getLogger("retrainer.serving.loader")


def sync_from_metadata(
    registry: ModelRegistry,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    *,
    batching: BatchingConfig | None = None,
) -> dict[str, str]:
    """One pass; returns what happened per pipeline ("loaded v3", "unchanged v3", "no champion", an error)."""
    with transaction(sessions) as session:
        wanted = []
        for pipeline in repo.list_pipelines(session):
            champion = repo.get_champion(session, pipeline.name)
            rollout = repo.active_rollout(session, pipeline.name)
            candidate = repo.get_model_version_by_id(session, rollout.candidate_version_id) if rollout else None
            weight = rollout.traffic_percent if rollout else 0.0
            wanted.append((pipeline.name, champion, candidate, weight))
    report: dict[str, str] = {}
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
    return report


class MetadataFollower:
    """Runs `sync_from_metadata` for one registry, one pass at a time: every `refresh_seconds` in a
    background thread, and on demand (`sync`, which the model server's load endpoint calls)."""

    def __init__(
        self,
        registry: ModelRegistry,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        *,
        batching: BatchingConfig | None = None,
    ) -> None:
        self.registry, self._sessions, self._store, self._batching = registry, sessions, store, batching
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self) -> dict[str, str]:
        with self._lock:
            return sync_from_metadata(self.registry, self._sessions, self._store, batching=self._batching)

    def start(self, refresh_seconds: float) -> None:
        def loop() -> None:
            while not self._stop.wait(refresh_seconds):
                try:
                    self.sync()
                except Exception:  # a database hiccup must not end the follower; the next pass retries
                    log.exception("reloading models from the metadata database failed; retrying")

        self._thread = threading.Thread(target=loop, name="retrainer-model-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
