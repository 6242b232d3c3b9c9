"""API key material (generation, constant-time verification) and what a key may do (its scopes).

A key is `rt_<prefix>_<secret>`. Only its sha256 is stored; the prefix (not secret) finds the row.
Keys carry 256 bits of randomness, so a fast hash is enough: there is nothing to brute-force.

Scopes (least privilege: a key created without `--scope` gets `read` only):
    read      GET the API's runs, pipelines, models and rollouts
    trigger   POST /api/v1/trigger/train
    operate   champion moves, rollout abort/promote, freezes; the model server's `stats` and `load`
    admin     API keys (reserved for key management over HTTP; the CLI needs database access instead)
    infer     the model server's inference, when RETRAINER_SERVING_REQUIRE_KEY is set
    feedback  the model server's feedback endpoint (labels decide a canary's accuracy check)
Keys made before scopes existed keep the API's full powers (`API_SCOPES`, migration 0007).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from domain.errors import InvalidInputError

KEY_PREFIX = "rt"
PREFIX_LENGTH = 8


class Scope(StrEnum):
    READ = "read"
    TRIGGER = "trigger"
    OPERATE = "operate"
    ADMIN = "admin"
    INFER = "infer"
    FEEDBACK = "feedback"


API_SCOPES = frozenset({Scope.READ, Scope.TRIGGER, Scope.OPERATE, Scope.ADMIN})
"""Every power an API key had before scopes: what migration 0007 gives each existing key."""
DEFAULT_SCOPES = frozenset({Scope.READ})

# Keys a process provisions for itself (`provision_api_key`): re-issued at each start, so no secret is configured.
CONTROLLER_KEY_NAME = "retrainer-canary-controller"  # operate: the model server's stats and load
TRAFFIC_KEY_NAME = "retrainer-demo-traffic"  # infer and feedback: the demo's load generator


def parse_scopes(names: Iterable[str]) -> frozenset[Scope]:
    """Scope names (repeats allowed) as Scopes; InvalidInputError naming each unknown one and the choices."""
    names = [name.strip().lower() for name in names]
    unknown = sorted({name for name in names if name not in Scope.__members__.values()})
    if unknown:
        choices = ", ".join(scope.value for scope in Scope)
        raise InvalidInputError(f"unknown API key scope(s) {', '.join(map(repr, unknown))}; choose from {choices}")
    return frozenset(Scope(name) for name in names)


def format_scopes(scopes: Iterable[str]) -> str:
    """Scopes in their declared order, space-separated: how they are stored and shown."""
    held = set(scopes)
    return " ".join(scope.value for scope in Scope if scope in held)


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
