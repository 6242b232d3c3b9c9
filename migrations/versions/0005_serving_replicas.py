"""serving replicas and their canary windows

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

serving_replicas: each model-server replica's heartbeat and what it serves per pipeline.
replica_windows: each replica's per-variant traffic between two consecutive reports, so the canary
controller judges a step on the sum over every replica (serving/reports.py, flows/canary.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "serving_replicas",
        sa.Column("replica_id", sa.String(length=200), nullable=False),
        sa.Column("address", sa.String(length=500), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reports_windows", sa.Boolean(), nullable=False),
        sa.Column("serving", _JSON, nullable=False),
        sa.PrimaryKeyConstraint("replica_id", name=op.f("pk_serving_replicas")),
    )
    with op.batch_alter_table("serving_replicas", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_serving_replicas_heartbeat_at"), ["heartbeat_at"], unique=False)

    op.create_table(
        "replica_windows",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("replica_id", sa.String(length=200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("pipeline", sa.String(length=200), nullable=False),
        sa.Column("variant", sa.String(length=16), nullable=False),
        sa.Column("version", sa.String(length=50), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("window", _JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replica_windows")),
        sa.UniqueConstraint(
            "replica_id",
            "seq",
            "pipeline",
            "variant",
            "version",
            name=op.f("uq_replica_windows_replica_id_seq_pipeline_variant_version"),
        ),
    )
    with op.batch_alter_table("replica_windows", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_replica_windows_pipeline_window_start"), ["pipeline", "window_start"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("replica_windows", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_replica_windows_pipeline_window_start"))
    op.drop_table("replica_windows")
    with op.batch_alter_table("serving_replicas", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_serving_replicas_heartbeat_at"))
    op.drop_table("serving_replicas")
