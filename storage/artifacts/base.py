"""The artifact store interface shared by every backend.

Artifacts are immutable and verified: a write never silently replaces other content under the
same key, and every read checks the bytes against the sha256 the caller recorded (from the
metadata database), refusing a mismatch. Writing without a key stores the object
content-addressed (`sha256/ab/<digest>`).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from domain.errors import ArtifactExistsError, ArtifactIntegrityError, InvalidInputError
from storage.artifacts.keys import content_key, validate_key

CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """Where an artifact is and what its bytes must hash to."""

    uri: str
    key: str
    sha256: str
    size: int


def sha256_of_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def iter_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_SIZE):
        yield chunk


class ArtifactStore(ABC):
    """A root (`file://…` or `s3://bucket/prefix`) holding immutable, digest-verified objects."""

    root_uri: str

    # -- what each backend provides -------------------------------------------------------
    @abstractmethod
    def uri_for(self, key: str) -> str: ...

    @abstractmethod
    def _write_new(self, key: str, source: Path | bytes, sha256: str, size: int) -> bool:
        """Writes the object only if the key is free; False if the key already exists."""

    @abstractmethod
    def _read_into(self, key: str, sink: BinaryIO) -> None:
        """Streams the stored bytes into `sink` (ArtifactNotFoundError if absent)."""

    @abstractmethod
    def stat(self, key: str) -> ArtifactRef | None:
        """The stored object's ref (digest as stored), or None if absent."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder-like key ending in '/'), sorted."""

    @abstractmethod
    def check(self) -> None:
        """Raises a one-line RetrainerError naming the setting if the store cannot be used."""

    # -- shared behaviour ------------------------------------------------------------------
    def key_of(self, uri: str) -> str:
        """The key of a URI inside this store's root (refusing URIs of other roots)."""
        prefix = self.uri_for("")
        if not uri.startswith(prefix):
            raise InvalidInputError(f"artifact {uri!r} is not under this store's root {self.root_uri!r}")
        return validate_key(uri[len(prefix) :])

    def ref(self, uri: str, sha256: str, size: int) -> ArtifactRef:
        return ArtifactRef(uri=uri, key=self.key_of(uri), sha256=sha256, size=size)

    def put_bytes(self, data: bytes, key: str | None = None) -> ArtifactRef:
        digest = hashlib.sha256(data).hexdigest()
        return self._put(data, digest, len(data), key)

    def put_file(self, path: Path, key: str | None = None) -> ArtifactRef:
        digest, size = sha256_of_file(path)
        return self._put(path, digest, size, key)

    def _put(self, source: Path | bytes, sha256: str, size: int, key: str | None) -> ArtifactRef:
        key = validate_key(key) if key is not None else content_key(sha256)
        if self._write_new(key, source, sha256, size):
            return ArtifactRef(uri=self.uri_for(key), key=key, sha256=sha256, size=size)
        existing = self.stat(key)
        if existing is not None and existing.sha256 == sha256:
            return existing  # the same bytes again: idempotent
        raise ArtifactExistsError(
            f"artifact {self.uri_for(key)} already exists with other content "
            f"(sha256 {existing.sha256 if existing else '?'}, not {sha256}); artifacts are immutable: "
            "write under a new key"
        )

    def read_bytes(self, ref: ArtifactRef) -> bytes:
        """The artifact's bytes, verified against `ref.sha256`."""
        import io

        buffer = io.BytesIO()
        self._read_into(validate_key(ref.key), buffer)
        data = buffer.getvalue()
        self._verify(ref, hashlib.sha256(data).hexdigest(), len(data))
        return data

    def download(self, ref: ArtifactRef, dest: Path) -> Path:
        """Writes the artifact to `dest` atomically, only after its digest has been verified."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial")
        try:
            with tmp.open("wb") as f:
                hashing = _HashingWriter(f)
                self._read_into(validate_key(ref.key), hashing)  # type: ignore[arg-type]
            self._verify(ref, hashing.digest.hexdigest(), hashing.size)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def exists(self, key: str) -> bool:
        return self.stat(validate_key(key)) is not None

    @staticmethod
    def _verify(ref: ArtifactRef, actual_sha256: str, actual_size: int) -> None:
        if actual_sha256 != ref.sha256:
            raise ArtifactIntegrityError(
                f"artifact {ref.uri} failed verification: sha256 is {actual_sha256} ({actual_size} bytes), "
                f"recorded {ref.sha256} ({ref.size} bytes); it was modified or corrupted after it was "
                "written, so it will not be used"
            )


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.inner.write(data)
