"""What every `retrainer` command shares: the two consoles, settings with logging, one transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console

from domain.settings import Settings, load_settings
from retrainer.logs import setup_logging

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

out = Console()
err = Console(stderr=True)


def settings() -> Settings:
    """Settings from the environment, with logging set up as they say."""
    loaded = load_settings()
    setup_logging(loaded.log_level, loaded.log_format)
    return loaded


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """Settings, logging and one database transaction: what most commands need."""
    from retrainer import wiring
    from storage.db import transaction

    with transaction(wiring.sessions(settings())) as session:
        yield session
