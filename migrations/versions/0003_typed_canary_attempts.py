"""typed canary attempts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

Data only: rewrites `rollout_steps.analysis` into the shape `domain.evidence.StepAnalysis` reads,
`{"attempts": [...], "action": ..., "reason": ...}` (each key optional), so no reader has to guess.

Rows written before it come in a few shapes: the controller's (attempts whose checks lack
`check`, `ci_low` and `ci_high`, windows that lack `rejected`), an empty or open step (`{}`,
`{"attempts": []}`, both kept as they are), a step closed by an operator (`action`
aborted/promoted, no attempt), and anything written by hand. The upgrade:
- adds `rejected: 0` to every window and `check: "canary"`, `ci_low`, `ci_high: null` to every
  check (revision 0002's code never wrote them);
- fills a key missing from an analysed window with its default (counts 0, measurements null, the
  analysis time the step's start, the traffic share the step's, text ""), and a missing top-level
  `action`/`reason` with the last attempt's;
- replaces a value the model cannot read: a count that is negative (0), fractional (rounded) or
  not a number (0), a measurement that is not a finite number (null), a time that does not parse
  or has no zone (the step's start / UTC), a version that is not text (its text), other non-text
  text (""), an unknown top-level `action` (the last attempt's);
- drops from `attempts`/`checks` an entry that is not an analysed window / a judged check;
- keeps every other key as it was.
Each drop, replacement and filled-in key is recorded in the row's `unparsed` list as
`{"at": [path...], "entry": original}` (no `entry`: the key was absent), in the order made.

The downgrade strips the four added keys and applies `unparsed` back in order (re-inserting a
dropped entry at its position, putting a replaced value back, removing a filled-in key), so every
row revision 0002 stored comes back exactly as it was. What it cannot restore: a row that already
held `rejected`, `check`, `ci_low` or `ci_high` before the upgrade loses them; attempts recorded
after the upgrade stay in the typed shape without those four keys (0002's code reads them); a step
still open at the upgrade that records another attempt afterwards was rewritten whole by the
repository, so keys the model does not know inside its earlier attempts are gone.

This revision is self-contained on purpose: a migration must keep meaning what it meant when it
was written, whatever `domain/` becomes later.
"""

from __future__ import annotations

import copy
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
COUNTS = ("requests", "errors", "labelled", "correct")
WINDOW_KEY_ADDED = "rejected"
CHECK_KEYS_ADDED = ("check", "ci_low", "ci_high")
UNPARSED = "unparsed"
_ABSENT = object()

Path = list[str | int]


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: object) -> int:
    number = _float(value)
    return max(round(number), 0) if number is not None else 0


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _version(value: object) -> str | None:
    return None if value is None or isinstance(value, dict | list) else str(value)


def _same(old: object, new: object) -> bool:
    return old == new and isinstance(old, bool) == isinstance(new, bool)


class _Upgrade:
    """Converts one step's analysis, recording in `unparsed` whatever it did not carry over as it was."""

    def __init__(self, traffic_percent: float, started_at: datetime) -> None:
        self.traffic_percent = traffic_percent
        self.started_at = (started_at if started_at.tzinfo else started_at.replace(tzinfo=UTC)).isoformat()
        self.unparsed: list[dict[str, Any]] = []

    def keep(self, at: Path, original: object = _ABSENT) -> None:
        self.unparsed.append({"at": at} if original is _ABSENT else {"at": at, "entry": original})

    def field(self, raw: dict[str, Any], at: Path | None, key: str, convert: Callable[[Any], Any], default: Any) -> Any:
        """raw[key] converted, or `default` if missing; a change is recorded unless `at` is None (the
        container itself was filled in and recorded whole)."""
        value = convert(raw[key]) if key in raw else default
        if at is not None and (key not in raw or not _same(raw[key], value)):
            self.keep([*at, key], raw.get(key, _ABSENT))
        return value

    def analysis(self, raw: object) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.keep([], raw)
            return {UNPARSED: self.unparsed}
        out = dict(raw)
        attempts: list[dict[str, Any]] = []
        if isinstance(raw.get("attempts"), list):
            entries = enumerate(raw["attempts"])
            out["attempts"] = attempts = [a for i, v in entries if (a := self.attempt(v, ["attempts", i])) is not None]
        elif "attempts" in raw:
            self.keep(["attempts"], out.pop("attempts"))
        last = attempts[-1] if attempts else None
        if "action" in raw or last is not None:
            fallback = last["action"] if last else None
            out["action"] = self.field(raw, [], "action", lambda v: v if v in ACTIONS | ENDS else fallback, fallback)
        if "reason" in raw or last is not None:
            fallback = last["reason"] if last else None
            out["reason"] = self.field(raw, [], "reason", lambda v: v if v is None else _text(v), fallback)
        if self.unparsed:
            out[UNPARSED] = self.unparsed
        return out

    def attempt(self, raw: object, at: Path) -> dict[str, Any] | None:
        if not isinstance(raw, dict) or raw.get("action") not in ACTIONS:
            self.keep(at, raw)  # not an analysed window: nothing could display or judge it
            return None
        share = self.traffic_percent
        out = dict(raw)
        out["reason"] = self.field(raw, at, "reason", lambda v: _text(v) or "", "")
        out["at"] = self.field(raw, at, "at", self._moment, self.started_at)
        out["elapsed_seconds"] = self.field(raw, at, "elapsed_seconds", lambda v: max(_float(v) or 0.0, 0.0), 0.0)
        out["traffic_percent"] = self.field(raw, at, "traffic_percent", lambda v: _or(_float(v), share), share)
        for variant in ("canary", "champion"):
            out[variant] = self.window(raw.get(variant, _ABSENT), [*at, variant])
        if not isinstance(raw.get("checks"), list):
            self.keep([*at, "checks"], raw.get("checks", _ABSENT))
        checks = enumerate(raw["checks"] if isinstance(raw.get("checks"), list) else [])
        out["checks"] = [c for j, v in checks if (c := self.check(v, [*at, "checks", j])) is not None]
        if "server_error" in raw:
            out["server_error"] = self.field(raw, at, "server_error", _text, None)
        return out

    def window(self, raw: object, at: Path) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.keep(at, raw)
        window = raw if isinstance(raw, dict) else {}
        where = at if isinstance(raw, dict) else None
        out = dict(window)
        out["version"] = self.field(window, where, "version", _version, None)
        out.update({name: self.field(window, where, name, _count, 0) for name in COUNTS})
        out[WINDOW_KEY_ADDED] = _count(window.get(WINDOW_KEY_ADDED, 0))
        for name in ("latency_p50_ms", "latency_p99_ms"):
            out[name] = self.field(window, where, name, _float, None)
        out["class_counts"] = self.field(window, where, "class_counts", self._class_counts, {})
        return out

    def check(self, raw: object, at: Path) -> dict[str, Any] | None:
        if not isinstance(raw, dict) or _text(raw.get("metric")) is None or raw.get("verdict") not in VERDICTS:
            self.keep(at, raw)
            return None
        out = dict(raw)
        out["reason"] = self.field(raw, at, "reason", lambda v: _text(v) or "", "")
        for name in ("candidate_value", "champion_value", "threshold"):
            out[name] = self.field(raw, at, name, _float, None)
        out["check"] = _text(raw.get("check")) or "canary"
        out.update({name: _float(raw.get(name)) for name in ("ci_low", "ci_high")})
        return out

    def _moment(self, value: object) -> str:
        if not isinstance(value, str):
            return self.started_at
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return self.started_at
        return value if moment.tzinfo else moment.replace(tzinfo=UTC).isoformat()

    @staticmethod
    def _class_counts(value: object) -> dict[str, int]:
        return {str(k): _count(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def typed_analysis(analysis: object, traffic_percent: float, started_at: datetime) -> dict[str, Any]:
    """The analysis in the typed shape, with `unparsed` saying what changed (public for the test)."""
    return _Upgrade(traffic_percent, started_at).analysis(analysis)


def untyped_analysis(analysis: object) -> object:
    """The analysis as revision 0002 stored it: the added keys stripped, `unparsed` applied back."""
    if not isinstance(analysis, dict):
        return analysis
    out = copy.deepcopy(analysis)
    unparsed = out.pop(UNPARSED, [])
    for attempt in out.get("attempts", []) if isinstance(out.get("attempts"), list) else []:
        if not isinstance(attempt, dict):
            continue
        for variant in ("canary", "champion"):
            if isinstance(attempt.get(variant), dict):
                attempt[variant].pop(WINDOW_KEY_ADDED, None)
        for check in attempt.get("checks", []) if isinstance(attempt.get("checks"), list) else []:
            for key in CHECK_KEYS_ADDED if isinstance(check, dict) else ():
                check.pop(key, None)
    for change in unparsed if isinstance(unparsed, list) else []:
        out = _put_back(out, change)
    return out


def _put_back(document: Any, change: dict[str, Any]) -> Any:
    if not change["at"]:
        return change["entry"]  # the whole analysis was not a JSON object
    *parents, last = change["at"]
    container = document
    for key in parents:
        try:
            container = container[key]
        except (KeyError, IndexError, TypeError):
            return document  # changed since the upgrade: that part is no longer the upgrade's to restore
    if isinstance(container, list) and isinstance(last, int):
        if "entry" in change:
            container.insert(last, change["entry"])
    elif isinstance(container, dict):
        if "entry" in change:
            container[last] = change["entry"]
        else:
            container.pop(last, None)
    return document


def _rewrite(convert: Callable[[object, float, datetime], object]) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(STEPS.c.id, STEPS.c.analysis, STEPS.c.traffic_percent, STEPS.c.started_at))
    for step_id, analysis, traffic_percent, started_at in rows.all():
        converted = convert(analysis, float(traffic_percent), started_at or datetime.now(UTC))
        if converted != analysis:
            conn.execute(sa.update(STEPS).where(STEPS.c.id == step_id).values(analysis=converted))


def upgrade() -> None:
    _rewrite(typed_analysis)


def downgrade() -> None:
    _rewrite(lambda analysis, _traffic, _started: untyped_analysis(analysis))
