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

    from domain.entities import Rollout

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


def print_decisive_checks(rollout: Rollout) -> None:
    """The rollout's latest analysed window (the one that decided its last step, or the one it waits
    on) and each check's evidence: outcome, statistic with the limit, interval or p-value, the
    significance level spent and the sample sizes. Windows stored before the checks were tests show
    their flat checks."""
    from rich.table import Table

    from web.canary_checks import HEADERS, check_rows

    step = next((s for s in reversed(rollout.steps) if s.analysis.attempts), None)
    if step is None or step.analysis.decisive is None:
        return
    attempt = step.analysis.decisive
    rows = check_rows(attempt)
    where = f"step {step.step_index + 1}, window {len(step.analysis.attempts)}: {attempt.action.value}"
    if not rows:
        out.print(f"{where}: no checks recorded", highlight=False)
        return
    table = Table(*HEADERS, title=f"checks of {where}", title_justify="left")
    for row in rows:
        table.add_row(*row.cells)
    out.print(table)
