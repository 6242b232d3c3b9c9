"""Context fields (pipeline, run_id, event_id) that every log line carries.

Held in contextvars so they follow a request, a consumer batch or a flow run across
function calls, threads started with `contextvars.copy_context()` and asyncio tasks. The JSON
formatter in `retrainer/logs.py` reads them; code anywhere binds them with `log_context`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

CONTEXT_FIELDS: tuple[str, ...] = ("pipeline", "run_id", "event_id")

_context: ContextVar[dict[str, Any] | None] = ContextVar("retrainer_log_context", default=None)


def current_log_context() -> dict[str, Any]:
    """The bound fields, with every standard field present (None where unbound)."""
    fields: dict[str, Any] = dict.fromkeys(CONTEXT_FIELDS)
    fields.update(_context.get() or {})
    return fields


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Bind fields for the duration of the block; nested blocks add to (and may shadow) outer ones."""
    merged = {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)
