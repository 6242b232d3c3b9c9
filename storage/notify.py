"""Wake-ups instead of fixed polling: a writer says "something changed on CHANNEL" in the transaction
that changed it, and whoever waits on that channel runs its next pass at once.

`notify(session, channel, payload)` is called by the writer inside its transaction. Once the
transaction commits, every in-process `Wakeup` subscribed to the channel is set (`retrainer serve`:
the consumer wakes the trigger service), and on PostgreSQL a `pg_notify` is sent with the commit, so
a listener in another process never wakes before the rows are visible. A rolled-back transaction
notifies nobody.

`Wakeups(sessions, channel)` is one waiter's side: its in-process `Wakeup` and, on PostgreSQL, a
`Listener` thread holding a dedicated autocommit psycopg connection that LISTENs on the channel. A
dropped connection is reconnected with tenacity's exponential back-off; every (re)connection wakes
the channel once, since what was notified while nobody listened is lost. SQLite has no notifications
across processes: there the waiter falls back to its poll interval, which stays in force everywhere
(a lost NOTIFY costs at most one interval, never a run).

Channels: `INBOX_CHANNEL` (events stored in the inbox; the trigger service waits on it) and
`SERVING_CHANNEL` (a champion alias or a rollout's weight moved, payload the pipeline; the model
server's follower waits on it), `KEYS_CHANNEL` (an API key revoked or re-issued, payload its name;
the model server's key cache forgets its verdicts).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from domain.errors import ConfigurationError

log = logging.getLogger("retrainer.storage.notify")

INBOX_CHANNEL = "retrainer_inbox"
SERVING_CHANNEL = "retrainer_serving"
KEYS_CHANNEL = "retrainer_keys"

# How often a waiter looks at its stop event while no wake-up comes, and how long the listener's
# connection blocks before it does the same: the bound on how long a stop takes, not on latency.
STOP_CHECK_S = 0.1
LISTEN_BLOCK_S = 0.5
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.5, 10.0

_PENDING = "retrainer_notify_pending"  # session.info key: channels to wake once this session commits


class Wakeup:
    """A wake-up flag that clears when a waiter takes it: a `set()` during a pass makes the next
    `wait` return at once, so nothing that arrives while the waiter works is slept through."""

    def __init__(self) -> None:
        self._fired = threading.Event()

    def set(self) -> None:
        self._fired.set()

    def wait(self, timeout_s: float, stop: threading.Event | None = None) -> bool:
        """True when woken, False after `timeout_s` or once `stop` is set."""
        if stop is None:
            woken = self._fired.wait(timeout_s)
        else:
            woken, left = False, timeout_s
            while left > 0 and not stop.is_set() and not woken:
                woken = self._fired.wait(min(STOP_CHECK_S, left))
                left -= STOP_CHECK_S
        self._fired.clear()  # what set it is committed already: the pass that follows sees it
        return woken


_lock = threading.Lock()
_subscribers: dict[str, weakref.WeakSet[Wakeup]] = {}


def subscribe(channel: str) -> Wakeup:
    """A Wakeup set by every commit that notifies `channel` in this process (held weakly: dropping
    it unsubscribes)."""
    wakeup = Wakeup()
    with _lock:
        _subscribers.setdefault(channel, weakref.WeakSet()).add(wakeup)
    return wakeup


def wake(channel: str) -> None:
    """Sets every in-process Wakeup of `channel` (a commit here, or a NOTIFY heard by a Listener)."""
    with _lock:
        waiting = list(_subscribers.get(channel, ()))
    for wakeup in waiting:
        wakeup.set()


def notify(session: Session, channel: str, payload: str = "") -> None:
    """Wakes `channel`'s waiters when the caller's transaction commits: in this process, and on
    PostgreSQL in every process that LISTENs (NOTIFY is transactional there)."""
    session.info.setdefault(_PENDING, set()).add(channel)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(channel, payload)))


@event.listens_for(Session, "after_commit")
def _wake_after_commit(session: Session) -> None:
    for channel in session.info.pop(_PENDING, ()):
        wake(channel)


@event.listens_for(Session, "after_soft_rollback")
def _forget_after_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    if previous_transaction.parent is None:  # the whole transaction, not a savepoint inside it
        session.info.pop(_PENDING, None)


def _engine_of(sessions: sessionmaker[Session]) -> Engine:
    engine = sessions.kw.get("bind")
    if not isinstance(engine, Engine):
        raise ConfigurationError("the sessionmaker has no engine bound; build it with storage.db.make_sessions")
    return engine


class Listener:
    """LISTENs on `channels` on a dedicated PostgreSQL connection in a daemon thread and wakes them
    in this process (`wake`) for every NOTIFY; reconnects with back-off when PostgreSQL drops it."""

    def __init__(self, engine: Engine, channels: Sequence[str]) -> None:
        url = engine.url.set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._where = url.render_as_string(hide_password=True)
        self._channels = tuple(channels)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="retrainer-pg-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=LISTEN_BLOCK_S + 5)

    def _run(self) -> None:
        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning("LISTEN on %s lost (%s); reconnecting in %.1f s", self._where, error, wait)

        retrying = Retrying(
            stop=lambda _state: self._stop.is_set(),
            wait=wait_exponential(multiplier=RECONNECT_FIRST_S, min=RECONNECT_FIRST_S, max=RECONNECT_MAX_S),
            retry=retry_if_exception_type(psycopg.Error),
            sleep=self._pause,
            before_sleep=before_sleep,
            retry_error_callback=lambda _state: None,
        )
        retrying(self._listen)

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _listen(self) -> None:
        with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as connection:
            for channel in self._channels:
                connection.execute(f'LISTEN "{channel}"')
            self.connected.set()
            try:
                for channel in self._channels:  # anything notified while nobody listened: look now
                    wake(channel)
                while not self._stop.is_set():
                    for heard in connection.notifies(timeout=LISTEN_BLOCK_S):
                        wake(heard.channel)
            finally:
                self.connected.clear()


class Wakeups:
    """One waiter's wake-ups on `channel` (see the module docstring): `start()` begins listening on
    PostgreSQL (nothing on SQLite), `next_pass(interval, stop)` waits for a wake-up or the interval
    and says whether to run a pass (False once `stop` is set), `stop()` ends the listener."""

    def __init__(self, sessions: sessionmaker[Session], channel: str) -> None:
        self.wakeup = subscribe(channel)
        engine = _engine_of(sessions)
        self.listener = Listener(engine, (channel,)) if engine.dialect.name == "postgresql" else None

    def start(self) -> None:
        if self.listener is not None:
            self.listener.start()

    def next_pass(self, interval_s: float, stop: threading.Event) -> bool:
        self.wakeup.wait(interval_s, stop)
        return not stop.is_set()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()

    def __enter__(self) -> Wakeups:
        self.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.stop()
