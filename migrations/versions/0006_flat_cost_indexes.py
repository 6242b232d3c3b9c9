"""indexes that keep the cost of reads flat as the history grows

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Each index serves a read that runs on every pass or request, so its cost stays that of the rows it
returns instead of growing with the inbox and run history (bench/flat_cost.py measures it):
- events (dataset, id) WHERE status = 'received': the debouncer's "which datasets wait" and "a
  dataset's waiting events, oldest first" (flows/triggers.py) read only the pending events;
- runs (pipeline_id, created_at, id), replacing (pipeline_id, created_at), and runs (created_at, id):
  the run lists and their cursors (GET /api/v1/runs) walk an index in the lists' order;
- alias_history (run_id): the decision record's alias moves of one run.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PENDING = "status = 'received'"


def upgrade() -> None:
    op.create_index(
        "ix_events_pending_dataset_id",
        "events",
        ["dataset", "id"],
        unique=False,
        sqlite_where=sa.text(_PENDING),
        postgresql_where=sa.text(_PENDING),
    )
    op.drop_index("ix_runs_pipeline_id_created_at", table_name="runs")
    op.create_index("ix_runs_pipeline_id_created_at_id", "runs", ["pipeline_id", "created_at", "id"], unique=False)
    op.create_index("ix_runs_created_at_id", "runs", ["created_at", "id"], unique=False)
    op.create_index("ix_alias_history_run_id", "alias_history", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_alias_history_run_id", table_name="alias_history")
    op.drop_index("ix_runs_created_at_id", table_name="runs")
    op.drop_index("ix_runs_pipeline_id_created_at_id", table_name="runs")
    op.create_index("ix_runs_pipeline_id_created_at", "runs", ["pipeline_id", "created_at"], unique=False)
    op.drop_index(
        "ix_events_pending_dataset_id",
        table_name="events",
        sqlite_where=sa.text(_PENDING),
        postgresql_where=sa.text(_PENDING),
    )
