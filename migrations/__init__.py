"""Alembic environment and revisions for the metadata schema in `storage/orm.py`.

`upgrade(url)` is what `retrainer db upgrade` runs; `alembic -c alembic.ini …` works too.
A new schema change: edit storage/orm.py, then
`alembic -c alembic.ini revision --autogenerate -m "what changed"`, review it, and run
`make test` (a test fails if the migrated schema and the ORM differ).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
