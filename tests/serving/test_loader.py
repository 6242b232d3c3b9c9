"""The model server follows the champion alias in the metadata database, verifying every artifact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from domain.errors import TransientInfraError
from domain.settings import load_settings
from ml.package import MANIFEST_FORMAT, save_package
from ml.zoo import build_model
from serving.loader import MetadataFollower, StaleModelsError, sync_from_metadata
from serving.registry import ModelRegistry
from storage import repositories as repo
from storage.artifacts import ArtifactStore, open_artifact_store
from storage.artifacts.local import path_from_file_uri
from storage.db import create_db_engine, make_sessions, transaction
from tests.serving.conftest import CLASSES, FEATURES, STANDARDIZER
from web.health import health_report

MANIFEST = {
    "format": MANIFEST_FORMAT, "architecture": "mlp", "params": {"hidden_sizes": [16]},
    "input_shape": [FEATURES], "output_classes": CLASSES, "variant": "none",
    "standardizer": STANDARDIZER.to_dict(), "feature_names": [f"f{i}" for i in range(FEATURES)],
}  # fmt: skip


def _metadata_and_store(tmp_path: Path) -> tuple[sessionmaker[Session], ArtifactStore]:
    """A migrated SQLite database at tmp_path/retrainer.db and a local artifact store."""
    url = f"sqlite:///{tmp_path / 'retrainer.db'}"
    migrations.upgrade(url)
    return make_sessions(create_db_engine(url)), open_artifact_store(
        f"file://{tmp_path / 'artifacts'}", load_settings()
    )


def _register(sessions: sessionmaker[Session], store: ArtifactStore, folder: Path, seed: int) -> e.ModelVersion:
    """A small model (weights from `seed`) stored and registered as the next version of digits."""
    torch.manual_seed(seed)
    module = build_model("mlp", {"hidden_sizes": [16]}, [FEATURES], CLASSES)
    ref = store.put_file(save_package(module, MANIFEST, folder / f"m{seed}.pt").path)
    with transaction(sessions) as session:
        return repo.register_model_version(
            session,
            "digits",
            artifact_uri=ref.uri,
            sha256=ref.sha256,
            size_bytes=ref.size,
            metrics={},
            manifest=MANIFEST,
        )


def _promote(sessions: sessionmaker[Session], version: e.ModelVersion) -> None:
    with transaction(sessions) as session:
        current = repo.get_champion(session, "digits")
        repo.move_champion(
            session,
            "digits",
            version.id,
            expected_from_version_id=current.id if current else None,
            actor="test",
            reason="test promotion",
        )


def test_champions_are_loaded_followed_and_never_swapped_for_a_tampered_artifact(tmp_path: Path) -> None:
    sessions, store = _metadata_and_store(tmp_path)

    def register(seed: int) -> int:
        version = _register(sessions, store, tmp_path, seed)
        _promote(sessions, version)
        return version.version

    with transaction(sessions) as session:
        repo.upsert_pipeline(session, "digits", "digits", {"name": "digits"})
    registry = ModelRegistry()
    assert sync_from_metadata(registry, sessions, store) == {"digits": "no champion yet"}
    assert not registry.is_ready()

    assert register(1) == 1
    assert sync_from_metadata(registry, sessions, store) == {"digits": "loaded champion v1"}
    assert sync_from_metadata(registry, sessions, store) == {"digits": "unchanged v1"}
    assert registry.is_ready() and registry.state("digits").champion.version == "1"  # type: ignore[union-attr]

    register(2)
    with transaction(sessions) as session:
        tampered = repo.get_champion(session, "digits")
    assert tampered is not None
    path_from_file_uri(tampered.artifact_uri).write_bytes(b"not the model that was verified")
    report = sync_from_metadata(registry, sessions, store)
    assert report["digits"].startswith("kept what was serving")
    assert registry.state("digits").champion.version == "1"  # type: ignore[union-attr]
    registry.close()


def test_the_canary_follows_the_rollout_stored_in_sql(tmp_path: Path) -> None:
    sessions, store = _metadata_and_store(tmp_path)
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, "digits", "digits", {"name": "digits"})
    ids = [_register(sessions, store, tmp_path, seed).id for seed in (1, 2)]
    with transaction(sessions) as session:
        repo.move_champion(session, "digits", ids[0], expected_from_version_id=None, actor="t", reason="first")
        rollout = repo.start_rollout(
            session, "digits", candidate_version_id=ids[1], champion_version_id=ids[0], policy={"steps": [10, 50, 100]}
        )
    registry = ModelRegistry()
    assert "canary v2 at 10 %" in sync_from_metadata(registry, sessions, store)["digits"]
    with transaction(sessions) as session:
        repo.record_rollout_step(session, rollout.id, step_index=0, traffic_percent=10, verdict=e.Verdict.PASS)
    assert "now at 50 %" in sync_from_metadata(registry, sessions, store)["digits"]
    assert registry.state("digits").canary_weight == 50
    with transaction(sessions) as session:
        repo.finish_rollout(session, rollout.id, e.RolloutStatus.ROLLED_BACK, "p99 ratio 3.1 > 1.2")
    assert "canary removed" in sync_from_metadata(registry, sessions, store)["digits"]
    assert registry.state("digits").canary is None
    registry.close()


def test_the_follower_probe_fails_while_a_stale_champion_is_served_and_recovers(tmp_path: Path) -> None:
    sessions, store = _metadata_and_store(tmp_path)
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, "digits", "digits", {"name": "digits"})
    _promote(sessions, _register(sessions, store, tmp_path, 1))
    follower = MetadataFollower(ModelRegistry(), sessions, store)
    assert follower.sync() == {"digits": "loaded champion v1"}
    follower.probe()  # healthy: what SQL says is what serves

    tampered = _register(sessions, store, tmp_path, 2)
    _promote(sessions, tampered)
    path_from_file_uri(tampered.artifact_uri).write_bytes(b"not the model that was verified")
    assert follower.sync()["digits"].startswith("kept what was serving")
    with pytest.raises(StaleModelsError) as stale:
        follower.probe()
    assert stale.value.code == "models_stale"
    assert "kept what was serving for digits:" in stale.value.message
    assert follower.registry.state("digits").champion.version == "1"  # type: ignore[union-attr]
    status, health = health_report({follower.name: follower.probe})
    assert status == 503 and health["checks"]["model-follower"]["code"] == "models_stale"

    _promote(sessions, _register(sessions, store, tmp_path, 3))  # a good champion: the next pass clears it
    assert follower.sync() == {"digits": "loaded champion v3"}
    follower.probe()

    # the database stops answering: a directory where its file was
    engine = sessions.kw["bind"]
    database = tmp_path / "retrainer.db"
    engine.dispose()
    database.rename(tmp_path / "aside.db")
    database.mkdir()
    with pytest.raises(TransientInfraError):
        follower.sync()
    with pytest.raises(StaleModelsError) as unreadable:
        follower.probe()
    assert "the metadata database could not be read" in unreadable.value.message
    assert "RETRAINER_DATABASE_URL" in unreadable.value.message

    database.rmdir()
    (tmp_path / "aside.db").rename(database)
    assert follower.sync() == {"digits": "unchanged v3"}
    follower.probe()
    follower.registry.close()
