"""Outcomes of a judgement, shared by the entities, the gate, the canary decision and its evidence:
a check's verdict (`Verdict`, `GateCheck`) and how a rollout ended (`RolloutStatus`).

They sit apart from `domain/entities.py` so that the evidence models (`domain/evidence.py`) and the
canary policy (`domain/spec.py`) can use them while the entities carry typed evidence in turn;
`domain.entities` re-exports all three, so `e.Verdict` and friends keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    PASS = "pass"  # noqa: S105 - a verdict, not a password
    FAIL = "fail"
    SKIPPED = "skipped"


class RolloutStatus(StrEnum):
    ACTIVE = "active"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class GateCheck:
    """One check's outcome, as the gate produces it and before it is stored as a GateVerdict."""

    metric: str
    check: str
    verdict: Verdict
    reason: str
    candidate_value: float | None = None
    champion_value: float | None = None
    threshold: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
