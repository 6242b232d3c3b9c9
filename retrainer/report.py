"""The self-contained HTML report that `retrainer demo` writes at the end: collected by
`api.report_data` (shared with the dashboard), rendered by `web.render` (Jinja2 templates in
`web/templates/`, shared with the dashboard too).

`collect_report(session)` reads everything from SQL into the frozen views of `web/views.py`;
`write_report` renders them and writes the file atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from api.report_data import collect_report
from storage.db import transaction
from web.canary_checks import DASH
from web.render import render_report, version
from web.views import ReportData

__all__ = ["collect_report", "runs_table_rows", "write_report"]

# ------------------------------------------------------------------------------ the CLI's table


def runs_table_rows(data: ReportData) -> list[tuple[str, ...]]:
    """(pipeline, run, trigger, dataset, version, status, reason) per run, pipelines by name and
    runs oldest first: the rows of the CLI's closing table."""
    return [
        (
            pipeline.name,
            run.short_id,
            run.trigger_kind,
            run.dataset_version or DASH,
            version(run.candidate_version),
            run.status,
            run.decision_reason or DASH,
        )
        for pipeline in data.pipelines
        for run in pipeline.runs
    ]


# -------------------------------------------------------------------------------------- writing


def write_report(
    sessions: sessionmaker[Session],
    path: Path,
    *,
    pipelines: Sequence[str] | None = None,
    title: str = "Retrainer demo report",
    generated_at: datetime | None = None,
) -> Path:
    """Collects, renders and writes the report atomically (a reader never sees half a file)."""
    with transaction(sessions) as session:
        data = collect_report(session, pipelines)
    document = render_report(data, title=title, generated_at=generated_at)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(document)
        Path(tmp).chmod(0o644)  # mkstemp makes it private; a report is meant to be opened and shared
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
