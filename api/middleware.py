"""What every request passes before a route sees it: the API key, the key's rate, the body size.

Both are plain ASGI middleware, so they run before FastAPI parses anything:

- `ApiKeyMiddleware` protects every path except the public ones (`/healthz`, `/metrics`), so a
  route added later is protected by default, and an unknown path or a malformed body answers 401
  to a caller without a key rather than revealing anything. The authenticated key's entity is left
  in `request.state.api_key` for routes: the actor of an override, and the scopes each route checks
  (`api.routes.requires`, 403 naming the scope missing).
- `BodySizeLimitMiddleware` refuses a declared Content-Length over the limit at once and counts
  the bytes of a streamed body, reading at most limit + 1 bytes before answering 413.

Their refusals are RetrainerErrors rendered by `api.errors.error_response`, the same function
the exception handlers use, so the code → status mapping stays single.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import PayloadTooLargeError, RateLimitedError, UnauthorizedError, error_response
from domain import entities as e
from domain.errors import RetrainerError
from storage import repositories as repo
from storage.db import transaction

API_KEY_HEADER = "X-API-Key"
PUBLIC_PATHS = frozenset({"/healthz", "/metrics"})
# A browser cannot send X-API-Key: the dashboard's pages check the key behind their own session
# cookie instead (api/dashboard.py), page by page, with the same scopes.
DASHBOARD_PREFIX = "/ui"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBucketLimiter:
    """Per-key token buckets in process memory: `per_minute` requests of burst, refilled evenly.

    One process's view only: with several API processes each allows `per_minute`. That is the
    intent (a guard against a runaway client, not a billing quota), so no shared store is needed.
    """

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError(f"rate_limit_per_minute must be at least 1 (got {per_minute})")
        self.capacity = float(per_minute)
        self.rate_per_second = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, key_id: int) -> float:
        """Takes one token for `key_id`: 0.0 if allowed, else the seconds until one is available."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = _Bucket(tokens=self.capacity, updated=now)
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate_per_second)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate_per_second


def _is_dashboard(path: str) -> bool:
    return path == DASHBOARD_PREFIX or path.startswith(DASHBOARD_PREFIX + "/")


class ApiKeyMiddleware:
    """Authenticates `X-API-Key` (hashed, constant-time, in the database) and applies the key's rate."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        sessions: sessionmaker[Session],
        limiter: TokenBucketLimiter,
        public_paths: Collection[str] = PUBLIC_PATHS,
    ) -> None:
        self.app = app
        self.sessions = sessions
        self.limiter = limiter
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = self._route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or path in self.public_paths or _is_dashboard(path):
            await self.app(scope, receive, send)
            return
        try:
            key = await self._authenticate(Headers(scope=scope).get(API_KEY_HEADER))
            wait = self.limiter.acquire(key.id)
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                raise RateLimitedError(
                    f"API key {key.name!r} is over its limit of {int(self.limiter.capacity)} requests per minute; "
                    f"retry in {seconds} s",
                    retry_after_seconds=seconds,
                )
        except RetrainerError as refused:
            await error_response(refused)(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)

    @staticmethod
    def _route_path(scope: Scope) -> str:
        # Behind a proxy that mounts the API under a prefix, scope["path"] carries root_path too.
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        return path[len(root) :] if root and path.startswith(root) else path

    async def _authenticate(self, presented: str | None) -> e.ApiKey:
        if not presented:
            raise UnauthorizedError(
                f"missing {API_KEY_HEADER} header; send a key created with `retrainer apikey create NAME`"
            )
        key = await run_in_threadpool(self._lookup, presented)
        if key is None:
            raise UnauthorizedError(
                f"{API_KEY_HEADER} is not a valid, unrevoked API key; create one with `retrainer apikey create NAME`"
            )
        return key

    def _lookup(self, presented: str) -> e.ApiKey | None:
        with transaction(self.sessions) as session:
            return repo.authenticate_api_key(session, presented)


class BodySizeLimitMiddleware:
    """Answers 413 to a body over `max_body_bytes`, before any of it is parsed.

    The body is read (at most limit + 1 bytes) and replayed to the app, so a client that sends
    no Content-Length, or a false one, is measured by what it actually sends.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1 (got {max_body_bytes})")
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self, sent: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body is too large ({sent}); the limit is {self.max_body_bytes} bytes; send a smaller body"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_body_bytes:
            await error_response(self._too_large(f"Content-Length {int(declared)} bytes"))(scope, receive, send)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                replay = [message]
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                await error_response(self._too_large(f"more than {self.max_body_bytes} bytes streamed"))(
                    scope, receive, send
                )
                return
            chunks.append(body)
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replaying_receive() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replaying_receive, send)
