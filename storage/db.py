"""Engines, sessions and the one place database errors become `domain.errors`.

`transaction(sessions)` is how callers own a unit of work: everything inside commits together
or not at all, and a driver error leaves as a RetrainerError that names RETRAINER_DATABASE_URL
and the (password-free) address.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from domain.errors import ConfigurationError, ConflictError, InfrastructureError, TransientInfraError

SETTING = "RETRAINER_DATABASE_URL"


def redacted(url: str | URL) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def create_db_engine(url: str, *, connect_timeout: float = 5.0, echo: bool = False) -> Engine:
    """An engine for sqlite:/// or postgresql[+driver]:// URLs, with sane per-backend defaults."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise ConfigurationError(f"{SETTING}: not a database URL ({url!r}); e.g. sqlite:///./x.db") from e

    kwargs: dict[str, Any] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    elif parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":  # plain scheme: use the driver we ship
            parsed = parsed.set(drivername="postgresql+psycopg")
        kwargs["connect_args"] = {"connect_timeout": max(1, int(connect_timeout))}
        kwargs["pool_pre_ping"] = True
    else:
        raise ConfigurationError(
            f"{SETTING}: unsupported database {parsed.get_backend_name()!r} in {redacted(parsed)}; "
            "use sqlite:/// or postgresql+psycopg://"
        )
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ArgumentError) as e:
        raise ConfigurationError(f"{SETTING}: cannot use {redacted(parsed)}: {e}") from e

    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")  # SQLite ignores foreign keys unless asked
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def translate_db_error(error: SQLAlchemyError, url: str | URL) -> Exception:
    """Map a SQLAlchemy/driver error to the domain hierarchy, naming the setting and address."""
    where = f"{SETTING}={redacted(url)}"
    if isinstance(error, IntegrityError):
        return ConflictError(f"database constraint violated: {_first_line(error.orig)}")
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return TransientInfraError(f"{where}: connection lost ({_first_line(error.orig)})")
    if isinstance(error, DBAPIError) and type(error).__name__ in ("OperationalError", "InterfaceError"):
        return TransientInfraError(f"{where}: database not reachable ({_first_line(error.orig)})")
    return InfrastructureError(f"{where}: {_first_line(error)}")


def _first_line(obj: object) -> str:
    lines = [line.strip() for line in str(obj).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(obj).__name__


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error, translate driver errors."""
    session = sessions()
    url = session.get_bind().engine.url
    try:
        with session.begin():
            yield session
    except SQLAlchemyError as e:
        raise translate_db_error(e, url) from e
    finally:
        session.close()


def check_database(engine: Engine) -> None:
    """Raises a one-line TransientInfraError/ConfigurationError if the database does not answer."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as e:
        raise translate_db_error(e, engine.url) from e


def database_probe(sessions: sessionmaker[Session]) -> Callable[[], None]:
    """A /healthz probe (`web.health`) of the database `sessions` is bound to: `check_database`."""
    engine = sessions.kw.get("bind")
    if not isinstance(engine, Engine):
        raise ConfigurationError("the sessionmaker has no engine bound; build it with storage.db.make_sessions")
    return functools.partial(check_database, engine)
