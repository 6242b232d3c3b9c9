"""One canary check of one analysed window as a row of short text cells: what the report
(`templates/rollout.html.j2`), `retrainer rollout show` and the controller's Prefect artifact print.

A row comes from the check's statistical evidence (`domain.evidence.CheckEvidence`: outcome,
statistic against the policy's limit, interval or p-value, the significance level spent, sample
sizes) or, for windows stored before the checks were tests (`CanaryAttempt.evidence == ()`), from
the flat `GateCheck` those windows kept: then there is no level and no sample size, and the values
are shown as stored (their units were not recorded with them).

Each check's numbers are shown in its own units: error rate in percent, the canary-minus-champion
differences (error rate vs champion, accuracy) in percentage points, latency as the canary/champion
p99 ratio, prediction drift as PSI, a regression canary's mean absolute error (`mae`) as its
relative change from the champion's, in percent, against the allowed increase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from domain.evidence import CanaryAttempt, CheckEvidence
from domain.outcomes import GateCheck

DASH = "—"


class _Units(NamedTuple):
    name: str  # what the statistic is
    limit: str  # what the threshold is to it
    write: Callable[[float], str]


# Flat rows of older windows use the plain number: their names did not fix the units they stored.
_PLAIN = _Units("", "limit", lambda v: f"{v:.4g}")
_UNITS: dict[str, _Units] = {
    "error_rate": _Units("rate", "limit", lambda v: f"{v * 100:.2f} %"),
    "error_rate_vs_champion": _Units("Δ rate", "limit", lambda v: f"{v * 100:+.2f} pp"),
    "latency": _Units("p99 ratio", "limit", lambda v: f"{v:.2f}x"),
    "prediction_drift": _Units("PSI", "limit", lambda v: f"{v:.3f}"),
    "accuracy": _Units("Δ accuracy", "margin", lambda v: f"{v * 100:+.2f} pp"),
    "mae": _Units("Δ MAE", "limit", lambda v: f"{v * 100:+.1f} %"),
}
# The evidence's fields a row shows as they are (its outcome is shown by its value).
_EVIDENCE_FIELDS = {
    "check",
    "reason",
    "statistic",
    "threshold",
    "interval",
    "p_value",
    "alpha",
    "canary_n",
    "champion_n",
}
HEADERS = ("check", "outcome", "statistic", "interval / p", "alpha", "n canary / champion")


@dataclass(frozen=True, slots=True)
class CheckRow:
    """One check of one window; `alpha` None: a flat row stored before the checks were tests."""

    check: str
    outcome: str  # pass, fail, not_yet; skipped on flat rows
    reason: str
    statistic: float | None
    threshold: float | None
    interval: tuple[float, float] | None = None
    p_value: float | None = None
    alpha: float | None = None
    canary_n: int | None = None
    champion_n: int | None = None
    champion_value: float | None = None  # flat rows only: the champion's figure beside the canary's

    @classmethod
    def of_evidence(cls, evidence: CheckEvidence) -> CheckRow:
        return cls(outcome=evidence.outcome.value, **evidence.model_dump(include=_EVIDENCE_FIELDS))

    @classmethod
    def of_gate_check(cls, check: GateCheck) -> CheckRow:
        low, high = check.ci_low, check.ci_high
        interval = (low, high) if low is not None and high is not None else None
        row = (check.metric, check.verdict.value, check.reason, check.candidate_value, check.threshold, interval)
        return cls(*row, champion_value=check.champion_value)

    @property
    def tested(self) -> bool:
        """Whether the row is a statistical test's evidence (not a flat row of an older window)."""
        return self.alpha is not None

    @property
    def _units(self) -> _Units:
        return _UNITS.get(self.check, _PLAIN) if self.tested else _PLAIN

    def _value(self, value: float | None) -> str:
        return DASH if value is None else self._units.write(value)

    @property
    def outcome_text(self) -> str:
        return self.outcome.replace("_", " ")

    @property
    def statistic_text(self) -> str:
        """The measured effect with the policy's limit (accuracy: its non-inferiority margin)."""
        units = self._units
        limit = self.threshold
        if limit is not None and units.limit == "margin":
            limit = -limit  # the margin is a drop: the difference may go down to -max_drop
        head = f"{units.name} {self._value(self.statistic)}".strip()
        parts = []
        if self.champion_value is not None:
            parts.append(f"champion {self._value(self.champion_value)}")
        if limit is not None:
            parts.append(f"{units.limit} {self._value(limit)}")
        return f"{head} ({'; '.join(parts)})" if parts else head

    @property
    def test_text(self) -> str:
        """The interval and/or the p-value the outcome rests on."""
        parts = []
        if self.interval is not None:
            parts.append(f"[{self._value(self.interval[0])}, {self._value(self.interval[1])}]")
        if self.p_value is not None:
            parts.append(f"p = {self.p_value:.3g}")
        return ", ".join(parts) or DASH

    @property
    def alpha_text(self) -> str:
        return DASH if self.alpha is None else f"{self.alpha:.3g}"

    @property
    def sizes_text(self) -> str:
        if self.canary_n is None:
            return DASH
        return str(self.canary_n) if self.champion_n is None else f"{self.canary_n} / {self.champion_n}"

    @property
    def cells(self) -> tuple[str, ...]:
        """The compact row, in the order of HEADERS."""
        return (self.check, self.outcome_text, self.statistic_text, self.test_text, self.alpha_text, self.sizes_text)


def check_rows(attempt: CanaryAttempt) -> tuple[CheckRow, ...]:
    """The window's checks: their evidence, or the flat checks of a window stored before it existed."""
    if attempt.evidence:
        return tuple(CheckRow.of_evidence(c) for c in attempt.evidence)
    return tuple(CheckRow.of_gate_check(c) for c in attempt.checks)


def markdown_table(attempt: CanaryAttempt) -> list[str]:
    """The window's checks as a Markdown table (with each check's reason), e.g. for a Prefect artifact."""
    rows = check_rows(attempt)
    if not rows:
        return []
    lines = ["| " + " | ".join((*HEADERS, "reason")) + " |", "|" + "---|" * (len(HEADERS) + 1)]
    return lines + ["| " + " | ".join(_md(cell) for cell in (*row.cells, row.reason)) + " |" for row in rows]


def _md(cell: str) -> str:
    # A pipe inside a cell would end it.
    return cell.replace("|", "\\|").replace("\n", " ")
