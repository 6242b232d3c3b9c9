"""submission claim time

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

runs.submission_claimed_at records when a trigger service claimed a run's submission
(prefect_flow_run_id = "submitting"), so a claim left by a process that died before recording the
flow run expires and the run is submitted again. Claims taken before this revision have no time:
they count as expired.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("submission_claimed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("submission_claimed_at")
