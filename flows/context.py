"""What a flow run needs from the outside world, built once from settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from domain.entities import ModelVersion
from domain.settings import Settings, load_settings
from storage.artifacts import ArtifactStore, open_artifact_store
from storage.db import create_db_engine, make_sessions, transaction


@dataclass
class FlowContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore

    @classmethod
    def open(cls, settings: Settings | None = None) -> FlowContext:
        settings = settings or load_settings()
        engine = create_db_engine(settings.database_url, connect_timeout=settings.connect_timeout_seconds)
        return cls(settings, engine, make_sessions(engine), open_artifact_store(settings.artifact_root, settings))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def tx(self) -> Iterator[Session]:
        with transaction(self.sessions) as session:
            yield session

    def workdir(self, run_id: str) -> Path:
        path = (self.settings.home_dir / "work" / run_id).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def champion_package(self, champion: ModelVersion, workdir: Path) -> Path:
        """The champion's package in the run's work folder, downloaded once per run (a warm start and
        the evaluation both need it); `load_package` verifies its sha256 at every load."""
        path = workdir / "champion" / f"v{champion.version}.pt"
        if not path.exists():
            ref = self.store.ref(champion.artifact_uri, champion.sha256, champion.size_bytes)
            self.store.download(ref, path)
        return path
