"""Alembic environment: runs migrations on the engine storage would build for the same URL."""

from __future__ import annotations

import os

from alembic import context

from storage.db import create_db_engine
from storage.orm import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    """`migrations.upgrade(url)` passes its URL in code; the alembic CLI (run with alembic.ini)
    takes RETRAINER_DATABASE_URL when it is set, like the rest of the service."""
    from_env = os.environ.get("RETRAINER_DATABASE_URL")
    if config.config_file_name is not None and from_env:
        return from_env
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set RETRAINER_DATABASE_URL or sqlalchemy.url")
    return url


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_db_engine(database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite changes tables by copying them
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
