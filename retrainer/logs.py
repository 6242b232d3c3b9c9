"""Structured logging, set up once for every process (`setup_logging`), and sent to a file instead of
the terminal while a command shows a progress view there (`logs_to_file`).

Each line is one JSON object with a timestamp, level, logger, message, the context fields
bound with `domain.logcontext.log_context` (pipeline, run_id, event_id — present as null
when unbound, so every line can be filtered by them), the OpenTelemetry `trace_id` and `span_id` of
the current span (`flows/tracing.py`; null without one), and any `extra={...}` fields.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from domain.logcontext import current_log_context
from flows.tracing import current_ids

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def _context() -> dict[str, Any]:
    """The bound context fields, then the current span's ids (a trace's lines are found by its id)."""
    trace_id, span_id = current_ids() or (None, None)
    return {**current_log_context(), "trace_id": trace_id, "span_id": span_id}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """For people at a terminal: the same fields, one readable line."""

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in _context().items() if v is not None)
        line = f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        return f"{line}  [{context}]" if context else line


_HANDLER_NAME = "retrainer"


def setup_logging(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Installs one handler on the root logger; calling it again replaces that handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "kafka", "alembic.runtime.migration", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


@contextmanager
def logs_to_file(path: Path, level: str = "INFO", fmt: str = "json") -> Iterator[Path]:
    """While the block runs, this process's logs are appended to `path` and stay off the terminal:
    the root handler writes there, and so does file descriptor 2, because libraries log through
    stderr handlers of their own that they install when they start inside the block (uvicorn when a
    server starts, Prefect when it is imported), where re-pointing loggers beforehand cannot reach
    them. stdout stays on the terminal. On exit the root handler goes back to stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    try:
        with path.open("a", encoding="utf-8") as sink:
            os.dup2(sink.fileno(), 2)
            setup_logging(level, fmt, stream=sink)
            try:
                yield path
            finally:
                setup_logging(level, fmt)
                sys.stderr.flush()
    finally:
        os.dup2(terminal, 2)
        os.close(terminal)
