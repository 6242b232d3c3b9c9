"""The dashboard's sign-in sessions: kept on the server, named by a signed, expiring cookie.

Signing in with an API key opens a session that remembers the key's id (never the key) and a CSRF
token of its own. The cookie carries the session id, its expiry and an HMAC of both under a secret
of this process, so a forged or altered cookie is refused before any lookup, and signing out ends
the session on the server, whatever copy of the cookie survives. The key itself is read again on
every request (`api/dashboard.py`): a revoked key or a changed scope takes effect at once.

Sessions live in this process's memory: a restart signs everyone out, and several API processes
behind one address need sticky sessions (or one signs in per process).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

COOKIE_NAME = "retrainer_session"
DEFAULT_LIFETIME_SECONDS = 8 * 3600
MAX_SESSIONS = 10_000  # beyond this the oldest are dropped: a flood of sign-ins cannot exhaust memory


@dataclass(slots=True)
class DashboardSession:
    session_id: str
    key_id: int
    csrf_token: str
    expires_at: float
    notice: tuple[str, str] | None = None  # (tone, text) shown once on the next page


class SessionStore:
    """Open, find and close sessions; thread-safe (routes run in Starlette's threadpool)."""

    def __init__(
        self, *, lifetime_seconds: float = DEFAULT_LIFETIME_SECONDS, clock: Callable[[], float] = time.time
    ) -> None:
        if lifetime_seconds <= 0:
            raise ValueError(f"lifetime_seconds must be positive (got {lifetime_seconds})")
        self.lifetime_seconds = lifetime_seconds
        self._clock = clock
        self._secret = secrets.token_bytes(32)
        self._sessions: dict[str, DashboardSession] = {}
        self._lock = threading.Lock()

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def open(self, key_id: int) -> tuple[str, DashboardSession]:
        """A new session for the key: (the cookie's value, the session)."""
        now = self._clock()
        session = DashboardSession(
            session_id=secrets.token_urlsafe(32),
            key_id=key_id,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=now + self.lifetime_seconds,
        )
        payload = f"{session.session_id}.{int(session.expires_at)}"
        with self._lock:
            self._prune(now)
            self._sessions[session.session_id] = session
        return f"{payload}.{self._mac(payload)}", session

    def find(self, cookie: str | None) -> DashboardSession | None:
        """The live session a cookie names; None for a missing, forged, expired or closed one."""
        if not cookie or cookie.count(".") != 2:
            return None
        session_id, expires, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac(f"{session_id}.{expires}")):
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.expires_at <= self._clock():
                self._sessions.pop(session_id, None)
                return None
            return session

    def close(self, session: DashboardSession) -> None:
        with self._lock:
            self._sessions.pop(session.session_id, None)

    def _prune(self, now: float) -> None:
        for session_id in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[session_id]
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]

    def csrf_matches(self, session: DashboardSession, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), session.csrf_token.encode())
