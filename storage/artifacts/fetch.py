"""Fetch data that lives outside our artifact root (a producer's `file://` or `s3://` URI).

Data-change events point at data wherever the producer keeps it: one file, or a folder / S3
prefix of files (Parquet shards). `fetch_uri` copies it to a local path atomically and returns its
digest, so the dataset version can record (and later verify) exactly which bytes a run trained on.

- A single file's digest is the sha256 of its bytes.
- A URI names a folder when it ends with `/`, or (`file://`) is a directory, or (`s3://`) no
  object has exactly that key. Every file below it is fetched, except those with a path segment
  starting with `.` or `_` (`_SUCCESS`, `.crc`: bookkeeping that `pyarrow.dataset` does not read
  either). The folder's digest is the sha256 of its manifest, `manifest_bytes`: the UTF-8 text
  `retrainer-dataset-manifest-v1\\n` followed by one line `KEY\\tSIZE\\tSHA256\\n` per file, sorted by
  KEY (the path relative to the folder with `/` separators; SIZE in bytes, decimal; SHA256 the
  lowercase hex digest of the file's bytes).

Given an artifact store (`manifests`), the manifest is kept there content-addressed (its key is
`sha256/<2>/<digest>`, so the recorded digest finds it), and a later fetch whose digest differs
names the first file that was changed, added or removed.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from domain.errors import ArtifactIntegrityError, ArtifactNotFoundError, InvalidInputError
from domain.settings import Settings
from storage.artifacts.base import ArtifactStore, sha256_of_file
from storage.artifacts.keys import content_key

MANIFEST_HEADER = "retrainer-dataset-manifest-v1\n"
_NEW_VERSION = "a version's data must not change: publish new data under a new version"


class ManifestEntry(NamedTuple):
    """One file of a folder dataset: its key relative to the folder, its size and sha256."""

    key: str
    size: int
    sha256: str


def manifest_bytes(entries: Sequence[ManifestEntry]) -> bytes:
    """The canonical manifest text whose sha256 is a folder's digest (see the module docstring)."""
    lines = [f"{entry.key}\t{entry.size}\t{entry.sha256}\n" for entry in sorted(entries, key=lambda e: e.key)]
    return (MANIFEST_HEADER + "".join(lines)).encode("utf-8")


def parse_manifest(data: bytes) -> list[ManifestEntry]:
    text = data.decode("utf-8")
    if not text.startswith(MANIFEST_HEADER):
        raise InvalidInputError("not a dataset manifest: the first line must be " + MANIFEST_HEADER.strip())
    entries = []
    for line in text[len(MANIFEST_HEADER) :].splitlines():
        key, size, sha256 = line.split("\t")
        entries.append(ManifestEntry(key, int(size), sha256))
    return entries


def first_difference(recorded: Sequence[ManifestEntry], current: Sequence[ManifestEntry]) -> str | None:
    """The first key (in sorted order) that differs between two manifests, said in words; None if equal."""
    before = {entry.key: entry for entry in recorded}
    after = {entry.key: entry for entry in current}
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old is None:
            return f"{key!r} was added"
        if new is None:
            return f"{key!r} was removed"
        if old != new:
            sizes = f"size {old.size} -> {new.size} bytes"
            return f"{key!r} changed ({sizes}, sha256 {old.sha256[:12]}… -> {new.sha256[:12]}…)"
    return None


def fetch_uri(
    uri: str, dest: Path, settings: Settings, expected_sha256: str | None = None, manifests: ArtifactStore | None = None
) -> str:
    """Copies `uri` (a file, or a folder/prefix of files) to `dest`; returns its digest.

    ArtifactIntegrityError if it differs from `expected_sha256`; for a folder the message names the
    first differing file when `manifests` holds the recorded manifest. ArtifactNotFoundError for
    nothing at `uri`; InvalidInputError for an empty folder or a URI that is neither scheme.
    """
    parts = urlsplit(uri)
    if parts.scheme not in _SOURCES:
        raise InvalidInputError(f"data URI {uri!r} must be file:// or s3://")
    source = _SOURCES[parts.scheme](uri, settings)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    _remove(tmp)
    try:
        if source.files is None:
            source.copy_file(tmp)
            digest, _ = sha256_of_file(tmp)
            if expected_sha256 is not None and digest != expected_sha256:
                raise ArtifactIntegrityError(
                    f"data {uri} has sha256 {digest}, but this dataset version was recorded as {expected_sha256}; "
                    "a version's bytes must not change: publish new data under a new version"
                )
        else:
            digest = _fetch_folder(uri, source, tmp, expected_sha256, manifests)
        _remove(dest)
        tmp.replace(dest)
        return digest
    finally:
        _remove(tmp)


def _fetch_folder(
    uri: str, source: _Source, tmp: Path, expected_sha256: str | None, manifests: ArtifactStore | None
) -> str:
    assert source.files is not None
    if not source.files:
        raise InvalidInputError(
            f"data folder {uri} holds no data files (it is empty or does not exist); an empty dataset cannot be "
            "trained: point data.uri at the folder or prefix that holds the Parquet files"
        )
    entries = []
    for key in source.files:
        target = tmp / key
        target.parent.mkdir(parents=True, exist_ok=True)
        source.copy_member(key, target)
        sha256, size = sha256_of_file(target)
        entries.append(ManifestEntry(key, size, sha256))
    manifest = manifest_bytes(entries)
    digest = hashlib.sha256(manifest).hexdigest()
    if expected_sha256 is None:
        if manifests is not None:
            manifests.put_bytes(manifest)
        return digest
    if digest != expected_sha256:
        raise ArtifactIntegrityError(
            f"data folder {uri}: {_what_changed(entries, expected_sha256, manifests)}; its manifest digest is now "
            f"{digest}, but this dataset version was recorded as {expected_sha256}; {_NEW_VERSION}"
        )
    return digest


def _what_changed(entries: list[ManifestEntry], expected: str, manifests: ArtifactStore | None) -> str:
    ref = manifests.stat(content_key(expected)) if manifests is not None else None
    if ref is None:
        return (
            f"its {len(entries)} file(s) differ from those recorded (the recorded manifest is not in the artifact "
            "store, so the first differing file cannot be named)"
        )
    change = first_difference(parse_manifest(manifests.read_bytes(ref)), entries)  # type: ignore[union-attr]
    return f"file {change}" if change else "its files differ from those recorded"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _is_data_file(key: str) -> bool:
    return not any(part.startswith((".", "_")) for part in PurePosixPath(key).parts)


# ----------------------------------------------------------------------------- sources by scheme


@dataclass
class _Source:
    """What a URI names: one file (`files` None) or the sorted keys of a folder's data files."""

    files: list[str] | None
    copy_file: Callable[[Path], None]
    copy_member: Callable[[str, Path], None]


def _file_source(uri: str, settings: Settings) -> _Source:
    parts = urlsplit(uri)
    root = Path(unquote(parts.netloc + parts.path)).expanduser()
    if root.is_dir():
        keys = sorted(
            path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file() or path.is_symlink()
        )
        return _Source(
            files=[key for key in keys if _is_data_file(key)],
            copy_file=_no_file,
            copy_member=lambda key, target: _copy_local(root / key, target),
        )
    if uri.endswith("/"):
        raise ArtifactNotFoundError(f"data folder {uri} does not exist")
    if not root.is_file():
        raise ArtifactNotFoundError(f"data {uri} does not exist")
    return _Source(files=None, copy_file=lambda target: _copy_local(root, target), copy_member=_no_member)


def _copy_local(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)


def _no_file(target: Path) -> None:
    raise AssertionError("a folder source has no single file to copy")


def _no_member(key: str, target: Path) -> None:
    raise AssertionError("a single-file source has no members")


def _s3_source(uri: str, settings: Settings) -> _Source:
    from botocore.exceptions import BotoCoreError, ClientError

    from storage.artifacts.s3 import S3ArtifactStore

    parts = urlsplit(uri)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    store = S3ArtifactStore(f"s3://{bucket}", settings)  # reuse its client set-up and error mapping

    def call(send: Callable[[], Any]) -> Any:
        try:
            return send()
        except (ClientError, BotoCoreError) as e:
            raise store._translate(e) from e

    def download(object_key: str, target: Path) -> None:
        call(lambda: store.client.download_file(bucket, object_key, str(target)))

    if key and not key.endswith("/"):
        found = store._request(key, lambda: store.client.head_object(Bucket=bucket, Key=key), declined=_S3_MISSING)
        if found is not None:
            return _Source(files=None, copy_file=lambda target: download(key, target), copy_member=_no_member)
    prefix = key.rstrip("/") + "/" if key else ""
    listed: list[str] = []
    for page in call(
        lambda: list(store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))
    ):
        listed += [str(obj["Key"])[len(prefix) :] for obj in page.get("Contents", [])]
    if not listed and not uri.endswith("/"):
        raise ArtifactNotFoundError(
            f"data {uri} does not exist (no object with that key, and none under it as a prefix)"
        )
    files = sorted(name for name in listed if name and not name.endswith("/") and _is_data_file(name))
    return _Source(files=files, copy_file=_no_file, copy_member=lambda name, target: download(prefix + name, target))


_S3_MISSING = ("404", "NoSuchKey", "NotFound")
_SOURCES: dict[str, Callable[[str, Settings], _Source]] = {"file": _file_source, "s3": _s3_source}
