"""Artifact stores chosen by URI scheme (`file://`, `s3://`) through a small registry.

    store = open_artifact_store(settings.artifact_root, settings)
    ref = store.put_file(Path("model.pt"), key="runs/123/model.pt")   # or content-addressed
    store.download(ref, Path("/tmp/model.pt"))                         # verified by sha256

A new backend registers a factory with `register_artifact_store("gs", factory)`.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from domain.errors import ConfigurationError
from domain.settings import Settings
from storage.artifacts.base import ArtifactRef, ArtifactStore
from storage.artifacts.keys import content_key, validate_key
from storage.artifacts.local import LocalArtifactStore

StoreFactory = Callable[[str, Settings], ArtifactStore]


def _s3(root_uri: str, settings: Settings) -> ArtifactStore:
    from storage.artifacts.s3 import S3ArtifactStore  # boto3 is imported only when S3 is used

    return S3ArtifactStore(root_uri, settings)


_REGISTRY: dict[str, StoreFactory] = {
    "file": lambda root_uri, _settings: LocalArtifactStore(root_uri),
    "s3": _s3,
}


def register_artifact_store(scheme: str, factory: StoreFactory) -> None:
    _REGISTRY[scheme] = factory


def open_artifact_store(root_uri: str, settings: Settings) -> ArtifactStore:
    scheme = urlsplit(root_uri).scheme
    factory = _REGISTRY.get(scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(_REGISTRY))
        raise ConfigurationError(f"RETRAINER_ARTIFACT_ROOT={root_uri}: unknown scheme {scheme!r}; use one of {known}")
    return factory(root_uri, settings)


__all__ = [
    "ArtifactRef",
    "ArtifactStore",
    "LocalArtifactStore",
    "content_key",
    "open_artifact_store",
    "register_artifact_store",
    "validate_key",
]
