"""typed canary attempts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

Data only: rewrites `rollout_steps.analysis` into the one shape `domain.evidence.StepAnalysis`
reads, `{"attempts": [...], "action": ..., "reason": ...}`, so no reader has to guess.

Rows written before it come in three shapes: the controller's (attempts whose checks lack
`check`, `ci_low` and `ci_high`, windows that lack `rejected`), an empty or open step (`{}`,
`{"attempts": []}`), and a step closed by an operator (`action` aborted/promoted, no attempt).
Missing counts become 0, missing or non-numeric measurements null, a missing analysis time the
step's start, a missing traffic share the step's; an entry that is not an analysed window (no
known action) is dropped, since nothing could display or judge it. Other top-level keys stay.

This revision is self-contained on purpose: a migration must keep meaning what it meant when it
was written, whatever `domain/` becomes later. Downgrade removes the keys this revision adds;
what remains is the shape revision 0002's code wrote and reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
STEPS = sa.table(
    "rollout_steps",
    sa.column("id", sa.Integer),
    sa.column("traffic_percent", sa.Float),
    sa.column("analysis", JSON),
    sa.column("started_at", sa.DateTime),
)

ACTIONS = {"wait", "repeat", "advance", "promote", "rollback"}
ENDS = {"promoted", "rolled_back", "aborted", "failed"}  # a rollout's end closing its open step
VERDICTS = {"pass", "fail", "skipped"}
COUNTS = ("requests", "errors", "rejected", "labelled", "correct")
CHECK_KEYS_ADDED = ("check", "ci_low", "ci_high")


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: object) -> int:
    number = _float(value)
    return max(round(number), 0) if number is not None else 0


def _text(value: object) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    return str(value)


def _window(value: object) -> dict[str, Any]:
    raw = value if isinstance(value, dict) else {}
    counts = raw.get("class_counts")
    return {
        "version": _text(raw.get("version")),
        **{key: _count(raw.get(key)) for key in COUNTS},
        "latency_p50_ms": _float(raw.get("latency_p50_ms")),
        "latency_p99_ms": _float(raw.get("latency_p99_ms")),
        "class_counts": {str(k): _count(v) for k, v in counts.items()} if isinstance(counts, dict) else {},
    }


def _check(value: object) -> dict[str, Any] | None:
    if not isinstance(value, dict) or _text(value.get("metric")) is None or value.get("verdict") not in VERDICTS:
        return None
    return {
        "metric": _text(value["metric"]),
        "check": _text(value.get("check")) or "canary",
        "verdict": value["verdict"],
        "reason": _text(value.get("reason")) or "",
        **{key: _float(value.get(key)) for key in ("candidate_value", "champion_value", "threshold")},
        "ci_low": _float(value.get("ci_low")),
        "ci_high": _float(value.get("ci_high")),
    }


def _at(value: object, fallback: datetime) -> str:
    moment = fallback
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = fallback
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def _attempt(value: object, traffic_percent: float, started_at: datetime) -> dict[str, Any] | None:
    if not isinstance(value, dict) or value.get("action") not in ACTIONS:
        return None
    checks = value.get("checks")
    traffic = _float(value.get("traffic_percent"))
    elapsed = _float(value.get("elapsed_seconds"))
    attempt = {
        "action": value["action"],
        "reason": _text(value.get("reason")) or "",
        "at": _at(value.get("at"), started_at),
        "elapsed_seconds": max(elapsed, 0.0) if elapsed is not None else 0.0,
        "traffic_percent": traffic if traffic is not None else traffic_percent,
        "canary": _window(value.get("canary")),
        "champion": _window(value.get("champion")),
        "checks": [c for c in map(_check, checks if isinstance(checks, list) else []) if c is not None],
    }
    if _text(value.get("server_error")):
        attempt["server_error"] = _text(value.get("server_error"))
    return attempt


def typed_analysis(analysis: object, traffic_percent: float, started_at: datetime) -> dict[str, Any]:
    """The analysis in the typed shape (public for the migration's test)."""
    raw = analysis if isinstance(analysis, dict) else {}
    listed = raw.get("attempts")
    entries = listed if isinstance(listed, list) else []
    attempts = [a for a in (_attempt(v, traffic_percent, started_at) for v in entries) if a is not None]
    last = attempts[-1] if attempts else {}
    action = raw.get("action") if raw.get("action") in ACTIONS | ENDS else last.get("action")
    reason = _text(raw.get("reason")) or last.get("reason")
    return {**raw, "attempts": attempts, "action": action, "reason": reason}


def untyped_analysis(analysis: object, _traffic_percent: float, _started_at: datetime) -> dict[str, Any]:
    """The analysis without the keys `typed_analysis` added (revision 0002's shape)."""
    raw = dict(analysis) if isinstance(analysis, dict) else {}
    attempts = raw.get("attempts")
    if isinstance(attempts, list):
        raw["attempts"] = [_without_added_keys(a) for a in attempts]
    return raw


def _without_added_keys(attempt: object) -> object:
    if not isinstance(attempt, dict):
        return attempt
    out = dict(attempt)
    for variant in ("canary", "champion"):
        if isinstance(out.get(variant), dict):
            out[variant] = {k: v for k, v in out[variant].items() if k != "rejected"}
    if isinstance(out.get("checks"), list):
        out["checks"] = [
            {k: v for k, v in c.items() if k not in CHECK_KEYS_ADDED} if isinstance(c, dict) else c
            for c in out["checks"]
        ]
    return out


def _rewrite(convert: Callable[[object, float, datetime], dict[str, Any]]) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(STEPS.c.id, STEPS.c.analysis, STEPS.c.traffic_percent, STEPS.c.started_at))
    for step_id, analysis, traffic_percent, started_at in rows.all():
        converted = convert(analysis, float(traffic_percent), started_at or datetime.now(UTC))
        if converted != analysis:
            conn.execute(sa.update(STEPS).where(STEPS.c.id == step_id).values(analysis=converted))


def upgrade() -> None:
    _rewrite(typed_analysis)


def downgrade() -> None:
    _rewrite(untyped_analysis)
