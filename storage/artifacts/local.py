"""Artifacts in a local folder (`file://PATH`), the embedded default.

Writes go to a temporary file in the destination folder, are fsynced, and are published with
`os.link`, which fails if the name exists: readers never see a partial file and an existing
object is never replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from domain.errors import ArtifactNotFoundError, ConfigurationError, UnsafeArtifactKeyError
from storage.artifacts.base import ArtifactRef, ArtifactStore, iter_chunks, sha256_of_file
from storage.artifacts.keys import validate_key

SETTING = "RETRAINER_ARTIFACT_ROOT"


def path_from_file_uri(uri: str) -> Path:
    """file:///abs/path, file://./relative/path or file://relative/path → a Path."""
    parts = urlsplit(uri)
    return Path(unquote(parts.netloc + parts.path)).expanduser()


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root_uri: str) -> None:
        self.root = path_from_file_uri(root_uri).resolve()
        self.root_uri = f"file://{self.root}"

    def uri_for(self, key: str) -> str:
        return f"file://{self.root}/{key}"

    def _path(self, key: str) -> Path:
        path = self.root / key
        # validate_key already refuses traversal; this also refuses a symlink that points outside.
        if not path.resolve().is_relative_to(self.root):
            raise UnsafeArtifactKeyError(f"artifact key {key!r} resolves outside {self.root_uri}")
        return path

    def _write_new(self, key: str, source: Path | bytes, sha256: str, size: int) -> bool:
        final = self._path(key)
        if final.exists():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(source, bytes):
                    out.write(source)
                else:
                    with source.open("rb") as src:
                        shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            written_sha256, _ = sha256_of_file(tmp)
            if written_sha256 != sha256:  # the source changed while we copied it
                raise OSError(errno.EIO, f"content of {source!r} changed during the copy")
            try:
                os.link(tmp, final)  # atomic, and refuses to replace an existing name
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                    raise
                if final.exists():  # filesystems without hard links: check, then rename
                    return False
                tmp.replace(final)
            self._fsync_dir(final.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _read_into(self, key: str, sink: BinaryIO) -> None:
        try:
            with self._path(key).open("rb") as f:
                for chunk in iter_chunks(f):
                    sink.write(chunk)
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ArtifactNotFoundError(f"artifact {self.uri_for(key)} does not exist") from e

    def stat(self, key: str) -> ArtifactRef | None:
        path = self._path(key)
        if not path.is_file():
            return None
        sha256, size = sha256_of_file(path)
        return ArtifactRef(uri=self.uri_for(key), key=key, sha256=sha256, size=size)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str) -> list[str]:
        folder = self._path(validate_key(prefix.rstrip("/")))
        if not folder.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".")  # skip in-flight temp files
        )

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".check-"):
                pass
        except OSError as e:
            raise ConfigurationError(f"{SETTING}={self.root_uri}: folder is not writable ({e.strerror})") from e
