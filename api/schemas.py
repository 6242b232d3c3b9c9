"""Request and response bodies of the HTTP API (CONTRACT section 3), as they appear in /openapi.json.

Request bodies forbid unknown fields: a typo is refused (422) rather than silently ignored, and
it keeps the canonical form of a trigger request (its Idempotency-Key digest) well defined.
Responses allow extra fields: the contract names the keys that must be there; more may follow.

The request schemas state every rule the API enforces, and the models accept nothing they forbid
(issue 16, schemathesis): lengths are checked on the string as sent and only then is it stripped;
a version is a JSON integer (2.0 is one, "2", true and 2.5 are not; JSON Schema 2020-12, the
dialect of OpenAPI 3.1); a time is an RFC 3339 string with a zone, never a number. Patterns use
Python's `re` (`regex_engine`), so a non-space (`\\S`) is what `str.strip` keeps.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic.config import JsonDict

from domain.evidence import StepAnalysis
from flows.champion import BLANK, FILLED, MIN_REASON_CHARS


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", regex_engine="python-re")


# `flows.champion` requires MIN_REASON_CHARS of an operator's justification (after stripping) and
# answers a shorter one with 400 invalid_input and its own message, for the CLI and the API alike, so
# the schema states the rule (minLength, and a pattern for "that many once stripped") without the
# model enforcing it a second time with another status.

_FILLED = FILLED  # a character that is not stripped (flows.champion.BLANK)
_NOT_BLANK = _FILLED
_JUSTIFICATION: JsonDict = {
    "minLength": MIN_REASON_CHARS,
    "pattern": rf"{_FILLED}[\s\S]{{{MIN_REASON_CHARS - 2},}}{_FILLED}",
}
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)", re.ASCII
)
MAX_VERSION = 2**31 - 1
"""model_versions.version is a 32-bit INTEGER column: a larger number can name no version."""


def _json_integer(value: object) -> object:
    # JSON Schema's "integer" is any number without a fractional part, 2.0 included; strict mode
    # then refuses what lax mode would coerce ("2", true).
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _rfc3339(value: object) -> object:
    # Lax datetime parsing takes numbers and "1700000000" as Unix times and "2030-01-01 00:00Z"
    # too; the schema says format date-time (RFC 3339), so only that string goes on to be parsed.
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time string with a zone, e.g. 2026-12-27T00:00:00Z")
    return value


# Lengths and patterns are checked on the string as sent (what the schema states), then it is stripped.
_Stripped = AfterValidator(lambda value: value.strip(BLANK))
Version = Annotated[int, Field(strict=True, ge=1, le=MAX_VERSION), BeforeValidator(_json_integer)]
Moment = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=_NOT_BLANK), _Stripped]
Actor = Annotated[str, StringConstraints(max_length=200), _Stripped]
Reason = Annotated[str, StringConstraints(max_length=2000), _Stripped]
Justification = Annotated[Reason, Field(json_schema_extra=_JUSTIFICATION)]
NotBlankReason = Annotated[str, StringConstraints(min_length=1, max_length=2000, pattern=_NOT_BLANK), _Stripped]


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------------------------- requests


class TriggerBody(_Request):
    pipeline: Name = Field(description="Name of a registered pipeline.")
    reason: Reason | None = Field(default=None, description="Why this run is wanted (kept on the run).")


class PromoteBody(_Request):
    version: Version = Field(description="Model version number to make champion.")
    reason: Justification = Field(description="Justification, at least 10 characters (alias history).")
    actor: Actor | None = Field(default=None, description="Who does this; default: the API key's name.")


class RollbackBody(_Request):
    to_version: Version | None = Field(
        default=None, description="An earlier champion's version; null: the previous champion."
    )
    reason: Justification = Field(description="Justification, at least 10 characters (alias history).")
    actor: Actor | None = Field(default=None, description="Who does this; default: the API key's name.")


class RolloutActionBody(_Request):
    reason: Justification = Field(description="Justification, at least 10 characters (stored on the rollout).")
    actor: Actor | None = Field(default=None, description="Who does this; default: the API key's name.")


class FreezeBody(_Request):
    until: Moment | None = Field(
        description="Hold automatic promotions until this RFC 3339 time with a zone (a string, never a number); "
        "null lifts the freeze."
    )
    reason: NotBlankReason = Field(description="Why (logged with the API key's name).")


# ------------------------------------------------------------------------------------ responses


class ErrorDetail(_Response):
    code: str = Field(description="Stable error code, e.g. not_found, idempotency_key_reused, rate_limited.")
    message: str = Field(description="What is wrong and how to fix it.")


class ErrorBody(_Response):
    error: ErrorDetail


class TriggerAccepted(_Response):
    run_id: str
    status: str = Field(description="The run's current status (queued for a new run).")
    created: bool = Field(description="False when an Idempotency-Key replay returned the existing run.")


class TriggerInfo(_Response):
    kind: Literal["event", "schedule", "manual"]
    event_ids: list[str]


class RunSummary(_Response):
    run_id: str
    pipeline: str
    status: str
    trigger: TriggerInfo
    model_version: int | None
    created_at: str
    finished_at: str | None


class RunDetail(RunSummary):
    decision: dict[str, Any] = Field(description="The decision record: data, metrics, gate verdicts, outcome.")


class RunList(_Response):
    runs: list[RunSummary] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null when this page is the last."
    )


class PipelineOut(_Response):
    name: str
    dataset: str
    champion_version: int | None
    frozen_until: str | None


class PipelineList(_Response):
    pipelines: list[PipelineOut]


class ReplicaOut(_Response):
    replica: str = Field(description="The model-server replica's id (host name, process id, suffix).")
    address: str | None
    champion_version: str | None = Field(description="The champion version this replica serves.")
    canary_version: str | None
    canary_weight: float = Field(description="Percent of this replica's traffic the canary gets.")
    since: str | None = Field(description="When the replica began serving exactly this (ISO 8601).")
    heartbeat_age_seconds: float
    state: Literal["live", "missing", "stopped"] = Field(
        description="missing: silent for over REPLICA_MISSING_AFTER_S seconds (domain/evidence.py) without stopping."
    )


class PipelineDetail(PipelineOut):
    replicas: list[ReplicaOut] = Field(
        description="Model-server replicas heard from in the last hour that serve this pipeline, and what each serves."
    )


class ModelVersionOut(_Response):
    version: int
    stage: str
    metrics: dict[str, Any]
    sha256: str
    run_id: str | None
    created_at: str


class ModelVersionList(_Response):
    versions: list[ModelVersionOut] = Field(description="Newest version first.")


class RolloutStepOut(_Response):
    step_index: int
    traffic_percent: float
    verdict: str | None
    analysis: StepAnalysis = Field(
        description="The step's analysed windows (both variants' numbers, checks, decision) and what closed it."
    )
    started_at: str
    finished_at: str | None


class RolloutOutcome(_Response):
    status: str
    reason: str | None
    finished_at: str | None


class RolloutOut(_Response):
    id: int
    pipeline: str
    run_id: str | None
    status: str
    candidate_version: int | None
    champion_version: int | None
    current_step: int
    traffic_percent: float = Field(
        description="Candidate's share of traffic now: the planned percent of the step in progress while "
        "active, 100 once promoted, 0 after any other end."
    )
    policy: dict[str, Any] = Field(description="The canary policy in force (planned steps, thresholds).")
    steps: list[RolloutStepOut] = Field(description="Analysed steps, in order.")
    outcome: RolloutOutcome | None = Field(description="Null while the rollout is active.")
    started_at: str
    finished_at: str | None


class AliasMoveOut(_Response):
    pipeline: str
    champion_version: int | None
    previous_version: int | None
    actor: str
    reason: str
    moved_at: str


class FreezeOut(_Response):
    pipeline: str
    frozen_until: str | None


class HealthOut(_Response):
    status: Literal["ok", "unavailable"]
    checks: dict[str, dict[str, str]]
