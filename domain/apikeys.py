"""API key material: generation and constant-time verification.

A key is `rt_<prefix>_<secret>`. Only its sha256 is stored; the prefix (not secret) finds the row.
Keys carry 256 bits of randomness, so a fast hash is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from domain.errors import InvalidInputError

KEY_PREFIX = "rt"
PREFIX_LENGTH = 8


@dataclass(frozen=True, slots=True)
class NewApiKey:
    plaintext: str  # shown once, never stored
    prefix: str
    sha256: str


def hash_api_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def generate_api_key() -> NewApiKey:
    prefix = secrets.token_hex(PREFIX_LENGTH // 2)
    plaintext = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    return NewApiKey(plaintext=plaintext, prefix=prefix, sha256=hash_api_key(plaintext))


def prefix_of(plaintext: str) -> str:
    """The lookup prefix of a presented key; InvalidInputError if it is not shaped like one."""
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != PREFIX_LENGTH:
        raise InvalidInputError("API key is malformed: expected rt_XXXXXXXX_…, as printed by `retrainer apikey create`")
    return parts[1]


def key_matches(plaintext: str, stored_sha256: str) -> bool:
    return hmac.compare_digest(hash_api_key(plaintext), stored_sha256)
