"""decision events: the outbox and webhook deliveries

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

outbox: each decision's CloudEvent (domain/decisions.py), written in the decision's transaction and
relayed to Kafka by `retrainer relay` (flows/relay.py); `sent_at` is NULL until the broker acked, and
a partial index keeps the relay's read of the unsent rows cheap however many were sent.
webhook_deliveries: one row per event and webhook URL, pending until delivered or failed after the
last try (flows/webhooks.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_UNSENT = sa.text("sent_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("pipeline", sa.String(length=200), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", _JSON, nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_event_id")),
    )
    op.create_index("ix_outbox_unsent_id", "outbox", ["id"], sqlite_where=_UNSENT, postgresql_where=_UNSENT)
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("outbox_id", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret_env", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["outbox_id"], ["outbox.id"], name=op.f("fk_webhook_deliveries_outbox_id_outbox"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("outbox_id", "url", name=op.f("uq_webhook_deliveries_outbox_id_url")),
    )
    op.create_index(op.f("ix_webhook_deliveries_status_id"), "webhook_deliveries", ["status", "id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_webhook_deliveries_status_id"), table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_outbox_unsent_id", table_name="outbox")
    op.drop_table("outbox")
