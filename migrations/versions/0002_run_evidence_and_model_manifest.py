"""run evidence and model manifest

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

runs.evidence keeps a run's evidence beyond the per-metric gate rows (candidate and champion
metrics on the same data, quantization report, training summary); model_versions.manifest says
how to rebuild and load a version's weights (architecture, params, shapes, variant, standardizer).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("evidence", JSON, nullable=True))
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("manifest", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("manifest")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("evidence")
