"""Entities: what the service knows, independent of how it is stored.

`storage/` converts its rows into these (``Sql*.to_entity()``); nothing above storage sees a
SQLAlchemy row. They are frozen: a change is a repository call, never a mutation in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from domain.evidence import StepAnalysis
from domain.outcomes import GateCheck as GateCheck
from domain.outcomes import RolloutStatus as RolloutStatus
from domain.outcomes import Verdict as Verdict
from domain.spec import CanarySpec


class TriggerKind(StrEnum):
    EVENT = "event"
    SCHEDULE = "schedule"
    MANUAL = "manual"


class RunStatus(StrEnum):
    """CONTRACT sections 3 and 7. queued, running, awaiting_approval (a person approves or rejects,
    flows/approvals.py) and canary are in progress; the rest are final."""

    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_APPROVAL = "awaiting_approval"
    REJECTED = "rejected"
    CANARY = "canary"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def is_final(self) -> bool:
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.AWAITING_APPROVAL, RunStatus.CANARY)


class ModelStage(StrEnum):
    CANDIDATE = "candidate"
    AWAITING_APPROVAL = "awaiting_approval"  # passed the gate; a person decides (flows/approvals.py)
    REJECTED = "rejected"
    CANARY = "canary"
    CHAMPION = "champion"
    RETIRED = "retired"
    ROLLED_BACK = "rolled_back"


class EventStatus(StrEnum):
    """Inbox state of one data-change event."""

    RECEIVED = "received"  # durably stored, no run yet
    LINKED = "linked"  # attached to a run
    IGNORED = "ignored"  # valid but triggers nothing (e.g. while_running=skip)


@dataclass(frozen=True, slots=True)
class Pipeline:
    id: int
    name: str
    dataset: str
    spec: dict[str, Any]
    spec_sha256: str
    champion_version_id: int | None
    frozen_until: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class DatasetVersion:
    id: int
    dataset: str
    version: str
    uri: str
    rows: int | None
    sha256: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class InboxEvent:
    """A data-change event as durably received from the bus (or recorded by the API)."""

    id: int
    event_id: str
    source: str
    type: str
    subject: str | None
    dataset: str
    topic: str | None
    partition: int | None
    offset: int | None
    status: EventStatus
    payload: dict[str, Any]
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    pipeline: str
    trigger_kind: TriggerKind
    status: RunStatus
    reason: str | None
    idempotency_key: str | None
    request_sha256: str | None
    dedupe_key: str | None
    prefect_flow_run_id: str | None
    dataset_version_id: int | None
    model_version_id: int | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    event_ids: tuple[str, ...] = field(default_factory=tuple)
    evidence: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ModelVersion:
    id: int
    pipeline: str
    version: int
    run_id: str | None
    artifact_uri: str
    sha256: str
    size_bytes: int
    metrics: dict[str, Any]
    stage: ModelStage
    created_at: datetime
    stage_changed_at: datetime
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """One metric's verdict in a run's promotion gate."""

    id: int
    run_id: str
    metric: str
    check: str  # "min" | "max" | "vs_champion" | "overall" | …
    verdict: Verdict
    candidate_value: float | None
    champion_value: float | None
    threshold: float | None
    ci_low: float | None
    ci_high: float | None
    reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RolloutStep:
    id: int
    rollout_id: int
    step_index: int
    traffic_percent: float
    verdict: Verdict | None
    analysis: StepAnalysis
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class Rollout:
    id: int
    pipeline: str
    run_id: str | None
    candidate_version_id: int
    champion_version_id: int | None
    status: RolloutStatus
    current_step: int
    policy: dict[str, Any]
    reason: str | None
    started_at: datetime
    finished_at: datetime | None
    steps: tuple[RolloutStep, ...] = field(default_factory=tuple)

    @property
    def canary_policy(self) -> CanarySpec:
        """The stored policy, validated when the rollout started (`CanarySpec`)."""
        return CanarySpec.model_validate(self.policy)

    @property
    def traffic_percent(self) -> float:
        """The candidate's share of traffic now: what the model server serves, the controller
        judges and the API shows (`CanarySpec.traffic_percent` is the rule)."""
        return self.canary_policy.traffic_percent(self.current_step, self.status)


@dataclass(frozen=True, slots=True)
class AliasMove:
    """One move of a pipeline's champion alias: who moved it, from where, to where, and why."""

    id: int
    pipeline: str
    alias: str
    from_version_id: int | None
    to_version_id: int | None
    run_id: str | None
    actor: str
    reason: str
    moved_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    scopes: frozenset[str] = frozenset()  # domain.apikeys.Scope values

    def allows(self, scope: str) -> bool:
        return scope in self.scopes
