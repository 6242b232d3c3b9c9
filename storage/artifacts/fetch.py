"""Fetch data that lives outside our artifact root (a producer's `file://` or `s3://` URI).

Data-change events point at data wherever the producer keeps it. `fetch_uri` copies it to a
local path atomically and returns its sha256, so the dataset version can record (and later
verify) exactly which bytes a run trained on.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from domain.errors import ArtifactIntegrityError, ArtifactNotFoundError, InvalidInputError
from domain.settings import Settings
from storage.artifacts.base import sha256_of_file


def fetch_uri(uri: str, dest: Path, settings: Settings, expected_sha256: str | None = None) -> str:
    """Copies `uri` to `dest`; returns the sha256 (ArtifactIntegrityError if it differs from expected)."""
    parts = urlsplit(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        if parts.scheme == "file":
            source = Path(unquote(parts.netloc + parts.path)).expanduser()
            if not source.is_file():
                raise ArtifactNotFoundError(f"data {uri} does not exist")
            shutil.copyfile(source, tmp)
        elif parts.scheme == "s3":
            _download_s3(parts.netloc, parts.path.lstrip("/"), tmp, settings)
        else:
            raise InvalidInputError(f"data URI {uri!r} must be file:// or s3://")
        digest, _ = sha256_of_file(tmp)
        if expected_sha256 is not None and digest != expected_sha256:
            raise ArtifactIntegrityError(
                f"data {uri} has sha256 {digest}, but this dataset version was recorded as {expected_sha256}; "
                "a version's bytes must not change: publish new data under a new version"
            )
        tmp.replace(dest)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _download_s3(bucket: str, key: str, dest: Path, settings: Settings) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from storage.artifacts.s3 import S3ArtifactStore

    store = S3ArtifactStore(f"s3://{bucket}", settings)  # reuse its client set-up and error mapping
    try:
        store.client.download_file(bucket, key, str(dest))
    except (ClientError, BotoCoreError) as e:
        raise store._translate(e) from e
