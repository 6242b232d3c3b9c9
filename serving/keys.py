"""The model server's API-key check: the same keys and scopes as the HTTP API (`domain/apikeys.py`),
looked up in the metadata database the server follows.

Inference is the hot path, so a valid key's verdict is cached for `ttl_s` (5 s); a key that is
not valid is looked up again on each request (nothing to serve it fast for). Revocation bypasses
the cache: `revoke_api_key` notifies `KEYS_CHANNEL` with its commit and every verdict is dropped
before the next request, at once in the revoking process and, on PostgreSQL, in every process
whose LISTEN hears it (milliseconds). Without PostgreSQL (SQLite, several processes), a revoked
key can still pass for at most `ttl_s`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.apikeys import Scope
from domain.errors import ForbiddenError, UnauthorizedError
from storage import repositories as repo
from storage.db import transaction
from storage.notify import KEYS_CHANNEL, Wakeups

API_KEY_HEADER = "X-API-Key"
GRPC_METADATA_KEY = "x-api-key"  # gRPC metadata keys are lower case
DEFAULT_TTL_S = 5.0


class KeyCheck:
    """`authorize(presented, scope)` → the key, or UnauthorizedError (401) / ForbiddenError (403).

    `require_for_infer` (RETRAINER_SERVING_REQUIRE_KEY): inference needs an `infer` key too; the
    other guarded endpoints (feedback, stats, load) always need their scope. `start()` begins
    listening for revocations on PostgreSQL; `stop()` ends it."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        require_for_infer: bool = False,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions, self.require_for_infer, self.ttl_s = sessions, require_for_infer, ttl_s
        self._clock = clock
        self._valid: dict[str, tuple[e.ApiKey, float]] = {}
        self._lock = threading.Lock()
        self._revocations = Wakeups(sessions, KEYS_CHANNEL)

    def start(self) -> KeyCheck:
        self._revocations.start()
        return self

    def stop(self) -> None:
        self._revocations.stop()

    def cached(self, presented: str) -> e.ApiKey | None:
        """The key's cached verdict if still fresh and no key was revoked since; None otherwise."""
        if self._revocations.wakeup.wait(0):  # set by a revocation's commit (here, or heard over LISTEN)
            with self._lock:
                self._valid.clear()
            return None
        hit = self._valid.get(presented)
        if hit is None or hit[1] < self._clock():
            return None
        return hit[0]

    def lookup(self, presented: str) -> e.ApiKey | None:
        """The database's verdict (blocking), cached when the key is valid."""
        with transaction(self.sessions) as session:
            key = repo.authenticate_api_key(session, presented, touch=False)
        if key is not None:
            with self._lock:
                self._valid[presented] = (key, self._clock() + self.ttl_s)
        return key

    async def authorize(self, presented: str | None, scope: Scope) -> e.ApiKey:
        if not presented:
            raise UnauthorizedError(
                f"missing {API_KEY_HEADER} header: this needs an API key with the {scope.value!r} scope "
                f"(`retrainer apikey create NAME --scope {scope.value}`)"
            )
        key = self.cached(presented) or await asyncio.to_thread(self.lookup, presented)
        if key is None:
            raise UnauthorizedError(
                f"{API_KEY_HEADER} is not a valid, unrevoked API key; create one with "
                f"`retrainer apikey create NAME --scope {scope.value}`"
            )
        if not key.allows(scope):
            raise ForbiddenError(
                f"API key {key.name!r} lacks the {scope.value!r} scope this needs; use a key created with "
                f"`retrainer apikey create NAME --scope {scope.value}`"
            )
        return key
