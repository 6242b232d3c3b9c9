"""The metadata schema as SQLAlchemy 2 typed ORM classes.

`migrations/` creates exactly this schema (a test compares the migrated database with
`Base.metadata`), so a change here needs a new Alembic revision. Rows never leave `storage/`:
each class converts itself with `to_entity()`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from domain import entities as e
from domain.decisions import DecisionEvent, DecisionType, DeliveryStatus, WebhookDelivery
from domain.errors import InfrastructureError
from domain.evidence import StepAnalysis


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite has no time zones of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware datetime (UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
JSONDict = JSON().with_variant(JSONB(), "postgresql")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SqlPipeline(Base):
    __tablename__ = "pipelines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    dataset: Mapped[str] = mapped_column(String(200), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONDict)
    spec_sha256: Mapped[str] = mapped_column(String(64))
    # The champion alias. Moved only by repositories.move_champion (compare-and-set + history row).
    champion_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", use_alter=True, ondelete="SET NULL")
    )
    frozen_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    def to_entity(self) -> e.Pipeline:
        return e.Pipeline(
            id=self.id,
            name=self.name,
            dataset=self.dataset,
            spec=dict(self.spec),
            spec_sha256=self.spec_sha256,
            champion_version_id=self.champion_version_id,
            frozen_until=self.frozen_until,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


class SqlDatasetVersion(Base):
    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[str] = mapped_column(String(200))
    uri: Mapped[str] = mapped_column(Text)
    rows: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_entity(self) -> e.DatasetVersion:
        return e.DatasetVersion(
            id=self.id,
            dataset=self.dataset,
            version=self.version,
            uri=self.uri,
            rows=self.rows,
            sha256=self.sha256,
            created_at=self.created_at,
        )


class SqlEvent(Base):
    """The inbox: one row per distinct CloudEvent id, written before the Kafka offset is committed."""

    __tablename__ = "events"
    __table_args__ = (
        Index(None, "dataset", "status"),
        # The debouncer's reads (which datasets wait, a dataset's waiting events in order) touch only
        # the few events still pending, however many the inbox has linked or ignored (revision 0006).
        Index(
            "ix_events_pending_dataset_id",
            "dataset",
            "id",
            sqlite_where=text("status = 'received'"),
            postgresql_where=text("status = 'received'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(500))
    type: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str | None] = mapped_column(String(200))
    dataset: Mapped[str] = mapped_column(String(200))
    topic: Mapped[str | None] = mapped_column(String(249))
    partition: Mapped[int | None] = mapped_column(Integer)
    offset: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=e.EventStatus.RECEIVED.value)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONDict)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_entity(self) -> e.InboxEvent:
        return e.InboxEvent(
            id=self.id,
            event_id=self.event_id,
            source=self.source,
            type=self.type,
            subject=self.subject,
            dataset=self.dataset,
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            status=e.EventStatus(self.status),
            payload=dict(self.payload),
            received_at=self.received_at,
        )


class SqlRunEvent(Base):
    """Which inbox events a run was created for (one run per debounce window, many events)."""

    __tablename__ = "run_events"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    event_pk: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), primary_key=True)


class SqlRun(Base):
    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("pipeline_id", "dedupe_key"),
        # Both run lists walk an index in their order (created_at, id): a page and its cursor cost
        # the same on the 100,000th run as on the first (revision 0006).
        Index(None, "pipeline_id", "created_at", "id"),
        Index(None, "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"))
    trigger_kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(32), index=True)  # 32: awaiting_approval is 17 (0008)
    reason: Mapped[str | None] = mapped_column(Text)
    # API Idempotency-Key; request_sha256 tells "same key, same body" from "same key, other body".
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    # One run per (pipeline, debounce window / schedule slot): the database decides, not memory.
    dedupe_key: Mapped[str | None] = mapped_column(String(300))
    prefect_flow_run_id: Mapped[str | None] = mapped_column(String(64))
    # When the submission in flight (prefect_flow_run_id = "submitting") was claimed: a claim whose
    # process died before recording the flow run expires, so the run is not queued for ever (0004).
    submission_claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dataset_version_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_versions.id"))
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", use_alter=True, ondelete="SET NULL")
    )
    error: Mapped[str | None] = mapped_column(Text)
    # The run's evidence beyond per-metric gate rows: candidate and champion metrics on the same
    # data, the quantization report, the training summary, the data split (revision 0002).
    evidence: Mapped[dict[str, Any] | None] = mapped_column(JSONDict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    pipeline: Mapped[SqlPipeline] = relationship(lazy="joined")
    events: Mapped[list[SqlEvent]] = relationship(secondary="run_events", order_by=SqlEvent.id)

    def to_entity(self) -> e.Run:
        return e.Run(
            id=self.id,
            pipeline=self.pipeline.name,
            trigger_kind=e.TriggerKind(self.trigger_kind),
            status=e.RunStatus(self.status),
            reason=self.reason,
            idempotency_key=self.idempotency_key,
            request_sha256=self.request_sha256,
            dedupe_key=self.dedupe_key,
            prefect_flow_run_id=self.prefect_flow_run_id,
            dataset_version_id=self.dataset_version_id,
            model_version_id=self.model_version_id,
            error=self.error,
            evidence=dict(self.evidence) if self.evidence else None,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            event_ids=tuple(ev.event_id for ev in self.events),
        )


class SqlModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("pipeline_id", "version"), Index(None, "pipeline_id", "stage"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    artifact_uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONDict)
    # How to rebuild and load the weights: architecture, params, shapes, variant, standardizer (0002).
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSONDict)
    stage: Mapped[str] = mapped_column(String(32))  # 32: awaiting_approval is 17 (0008)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stage_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    pipeline: Mapped[SqlPipeline] = relationship(lazy="joined", foreign_keys=[pipeline_id])

    def to_entity(self) -> e.ModelVersion:
        return e.ModelVersion(
            id=self.id,
            pipeline=self.pipeline.name,
            version=self.version,
            run_id=self.run_id,
            artifact_uri=self.artifact_uri,
            sha256=self.sha256,
            size_bytes=self.size_bytes,
            metrics=dict(self.metrics),
            manifest=dict(self.manifest) if self.manifest else {},
            stage=e.ModelStage(self.stage),
            created_at=self.created_at,
            stage_changed_at=self.stage_changed_at,
        )


class SqlGateDecision(Base):
    """One row per metric check of a run's promotion gate, plus one `overall` row."""

    __tablename__ = "gate_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    metric: Mapped[str] = mapped_column(String(100))
    check: Mapped[str] = mapped_column(String(32))
    verdict: Mapped[str] = mapped_column(String(16))
    candidate_value: Mapped[float | None] = mapped_column(Float)
    champion_value: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_entity(self) -> e.GateVerdict:
        return e.GateVerdict(
            id=self.id,
            run_id=self.run_id,
            metric=self.metric,
            check=self.check,
            verdict=e.Verdict(self.verdict),
            candidate_value=self.candidate_value,
            champion_value=self.champion_value,
            threshold=self.threshold,
            ci_low=self.ci_low,
            ci_high=self.ci_high,
            reason=self.reason,
            created_at=self.created_at,
        )


class SqlRollout(Base):
    __tablename__ = "rollouts"
    __table_args__ = (
        # At most one active rollout per pipeline, enforced by the database (partial unique index).
        Index(
            "uq_rollouts_one_active_per_pipeline",
            "pipeline_id",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"))
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    candidate_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    champion_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    status: Mapped[str] = mapped_column(String(16))
    current_step: Mapped[int] = mapped_column(Integer, default=0)
    policy: Mapped[dict[str, Any]] = mapped_column(JSONDict)
    reason: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    pipeline: Mapped[SqlPipeline] = relationship(lazy="joined")
    steps: Mapped[list[SqlRolloutStep]] = relationship(order_by="SqlRolloutStep.step_index")

    def to_entity(self) -> e.Rollout:
        return e.Rollout(
            id=self.id,
            pipeline=self.pipeline.name,
            run_id=self.run_id,
            candidate_version_id=self.candidate_version_id,
            champion_version_id=self.champion_version_id,
            status=e.RolloutStatus(self.status),
            current_step=self.current_step,
            policy=dict(self.policy),
            reason=self.reason,
            started_at=self.started_at,
            finished_at=self.finished_at,
            steps=tuple(step.to_entity() for step in self.steps),
        )


class SqlRolloutStep(Base):
    __tablename__ = "rollout_steps"
    __table_args__ = (UniqueConstraint("rollout_id", "step_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    step_index: Mapped[int] = mapped_column(Integer)
    traffic_percent: Mapped[float] = mapped_column(Float)
    verdict: Mapped[str | None] = mapped_column(String(16))
    analysis: Mapped[dict[str, Any]] = mapped_column(JSONDict)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def to_entity(self) -> e.RolloutStep:
        return e.RolloutStep(
            id=self.id,
            rollout_id=self.rollout_id,
            step_index=self.step_index,
            traffic_percent=self.traffic_percent,
            verdict=e.Verdict(self.verdict) if self.verdict else None,
            analysis=self.typed_analysis(),
            started_at=self.started_at,
            finished_at=self.finished_at,
        )

    def typed_analysis(self) -> StepAnalysis:
        """The stored JSON as the domain's model: the one place a step's analysis is parsed."""
        try:
            return StepAnalysis.model_validate(self.analysis)
        except ValidationError as err:
            raise InfrastructureError(
                f"rollout {self.rollout_id} step {self.step_index}: the stored analysis is not a "
                f"domain.evidence.StepAnalysis ({err.errors()[0]['loc']}: {err.errors()[0]['msg']}); "
                "run `retrainer db upgrade` (revision 0003 rewrites older rows)"
            ) from err

    def store_analysis(self, analysis: StepAnalysis) -> None:
        """Writes the model as JSON. Keys it does not know stay (revision 0003 keeps what it could not
        parse under `unparsed`, for its downgrade)."""
        self.analysis = {**(self.analysis or {}), **analysis.model_dump(mode="json")}


class SqlAliasMove(Base):
    __tablename__ = "alias_history"
    # run_id: the decision record reads a run's alias moves (revision 0006).
    __table_args__ = (Index(None, "pipeline_id", "moved_at"), Index(None, "run_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(String(50))
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    to_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    moved_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    pipeline: Mapped[SqlPipeline] = relationship(lazy="joined")

    def to_entity(self) -> e.AliasMove:
        return e.AliasMove(
            id=self.id,
            pipeline=self.pipeline.name,
            alias=self.alias,
            from_version_id=self.from_version_id,
            to_version_id=self.to_version_id,
            run_id=self.run_id,
            actor=self.actor,
            reason=self.reason,
            moved_at=self.moved_at,
        )


class SqlApiKey(Base):
    """API keys, stored as sha256 of the secret; the prefix finds the row without the secret."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    scopes: Mapped[str] = mapped_column(String(200))  # space-separated domain.apikeys.Scope values

    def to_entity(self) -> e.ApiKey:
        return e.ApiKey(
            id=self.id,
            name=self.name,
            prefix=self.prefix,
            created_at=self.created_at,
            revoked_at=self.revoked_at,
            last_used_at=self.last_used_at,
            scopes=frozenset(self.scopes.split()),
        )


class SqlServingReplica(Base):
    """A model-server replica: its heartbeat and what it serves per pipeline (`serving/reports.py`)."""

    __tablename__ = "serving_replicas"

    replica_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    address: Mapped[str | None] = mapped_column(String(500))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reports_windows: Mapped[bool] = mapped_column(Boolean, default=False)
    serving: Mapped[dict[str, Any]] = mapped_column(JSONDict)


class SqlReplicaWindow(Base):
    """One replica's traffic of one variant between two consecutive reports: disjoint slices, so a
    step's window over the fleet is the plain sum of the slices that began after it opened."""

    __tablename__ = "replica_windows"
    __table_args__ = (
        UniqueConstraint("replica_id", "seq", "pipeline", "variant", "version"),
        Index(None, "pipeline", "window_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    replica_id: Mapped[str] = mapped_column(String(200))
    seq: Mapped[int] = mapped_column(BigInteger)
    pipeline: Mapped[str] = mapped_column(String(200))
    variant: Mapped[str] = mapped_column(String(16))
    version: Mapped[str] = mapped_column(String(50))
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[datetime] = mapped_column(UTCDateTime)
    requests: Mapped[int] = mapped_column(Integer)
    window: Mapped[dict[str, Any]] = mapped_column(JSONDict)


def partial_index(name: str, *columns: str, where: str) -> Index:
    """An index of only the rows `where` holds for, on SQLite and PostgreSQL alike."""
    return Index(name, *columns, sqlite_where=text(where), postgresql_where=text(where))


class SqlOutboxEvent(Base):
    """A decision event (domain/decisions.py), written in the decision's transaction and relayed
    to Kafka and webhooks afterwards (flows/relay.py); `sent_at` is set once the broker acked (0009)."""

    __tablename__ = "outbox"
    # The relay reads only the unsent rows, in order, however many were sent before.
    __table_args__ = (partial_index("ix_outbox_unsent_id", "id", where="sent_at IS NULL"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    type: Mapped[str] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(200))
    pipeline: Mapped[str] = mapped_column(String(200))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    data: Mapped[dict[str, Any]] = mapped_column(JSONDict)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def to_entity(self) -> DecisionEvent:
        return DecisionEvent(
            self.event_id, DecisionType(self.type), self.pipeline, self.time, dict(self.data), self.source
        )


class SqlWebhookDelivery(Base):
    """One decision event to one webhook: pending until delivered, or failed after its last try (0009)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("outbox_id", "url"), Index(None, "status", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    outbox_id: Mapped[int] = mapped_column(ForeignKey("outbox.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    secret_env: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    response_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    event: Mapped[SqlOutboxEvent] = relationship(lazy="joined")

    def to_entity(self) -> WebhookDelivery:
        return WebhookDelivery(
            id=self.id,
            event=self.event.to_entity(),
            url=self.url,
            secret_env=self.secret_env,
            status=DeliveryStatus(self.status),
            attempts=self.attempts,
            response_status=self.response_status,
            error=self.error,
            created_at=self.created_at,
            finished_at=self.finished_at,
        )
