"""Request and response bodies of the HTTP API (CONTRACT section 3), as they appear in /openapi.json.

Request bodies forbid unknown fields: a typo is refused (422) rather than silently ignored, and
it keeps the canonical form of a trigger request (its Idempotency-Key digest) well defined.
Responses allow extra fields: the contract names the keys that must be there; more may follow.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from domain.evidence import StepAnalysis


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------------------------- requests


class TriggerBody(_Request):
    pipeline: str = Field(min_length=1, max_length=200, description="Name of a registered pipeline.")
    reason: str | None = Field(default=None, max_length=2000, description="Why this run is wanted (kept on the run).")


class PromoteBody(_Request):
    version: int = Field(ge=1, description="Model version number to make champion.")
    reason: str = Field(max_length=2000, description="Justification, at least 10 characters (alias history).")
    actor: str | None = Field(default=None, max_length=200, description="Who does this; default: the API key's name.")


class RollbackBody(_Request):
    to_version: int | None = Field(
        default=None, ge=1, description="An earlier champion's version; null: the previous champion."
    )
    reason: str = Field(max_length=2000, description="Justification, at least 10 characters (alias history).")
    actor: str | None = Field(default=None, max_length=200, description="Who does this; default: the API key's name.")


class RolloutActionBody(_Request):
    reason: str = Field(max_length=2000, description="Justification, at least 10 characters (stored on the rollout).")
    actor: str | None = Field(default=None, max_length=200, description="Who does this; default: the API key's name.")


class FreezeBody(_Request):
    until: AwareDatetime | None = Field(
        description="Hold automatic promotions until this ISO 8601 time with a zone; null lifts the freeze."
    )
    reason: str = Field(min_length=1, max_length=2000, description="Why (logged with the API key's name).")


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


class PipelineOut(_Response):
    name: str
    dataset: str
    champion_version: int | None
    frozen_until: str | None


class PipelineList(_Response):
    pipelines: list[PipelineOut]


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
