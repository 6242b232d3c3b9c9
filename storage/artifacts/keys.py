"""Artifact keys: what may name an object inside a store's root.

Keys are relative, slash-separated and plain. Anything that could climb out of the root or be
read differently by another layer (a filesystem, an HTTP proxy, S3 itself) is refused: `..` and
`.` segments, absolute paths, drive letters, backslashes, empty segments, control characters,
and percent-encoding (which could hide any of those).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from domain.errors import UnsafeArtifactKeyError

MAX_KEY_LENGTH = 512
_ALLOWED = re.compile(r"[A-Za-z0-9._\-=+@/]+")


def validate_key(key: str) -> str:
    """Returns `key` unchanged if it is safe, else raises UnsafeArtifactKeyError saying why."""

    def refuse(why: str) -> UnsafeArtifactKeyError:
        return UnsafeArtifactKeyError(
            f"artifact key {key!r} refused: {why}; use a relative path like 'runs/RUN_ID/model.pt'"
        )

    if not key:
        raise refuse("it is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise refuse(f"it is longer than {MAX_KEY_LENGTH} characters")
    decoded = key
    for _ in range(3):  # double- and triple-encoding too
        decoded = unquote(decoded)
    for candidate in {key, decoded}:
        if "\\" in candidate:
            raise refuse("backslashes are not allowed")
        if candidate.startswith("/") or re.match(r"^[A-Za-z]:", candidate):
            raise refuse("absolute paths are not allowed")
        if any(segment in ("..", ".") for segment in candidate.split("/")):
            raise refuse("'.' and '..' segments are not allowed")
    if "%" in key:
        raise refuse("percent-encoding is not allowed")
    if "//" in key or key.endswith("/"):
        raise refuse("empty path segments are not allowed")
    if not _ALLOWED.fullmatch(key):
        raise refuse("only letters, digits and . _ - = + @ / are allowed")
    return key


def content_key(sha256: str) -> str:
    """Where content-addressed objects live: sha256/ab/abcdef…"""
    return f"sha256/{sha256[:2]}/{sha256}"
