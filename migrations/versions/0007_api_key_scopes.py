"""API key scopes: what each key may do

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

api_keys.scopes holds the key's scopes, space-separated (`domain.apikeys.Scope`). Every key that
exists before this revision keeps the powers it had, the API's all: `read trigger operate admin`.
The server default only fills those rows and is dropped after, so a key inserted later without
scopes gets none rather than everything (`retrainer apikey create` gives `read` by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EXISTING_KEYS_KEEP = "read trigger operate admin"  # domain.apikeys.API_SCOPES, as stored


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("scopes", sa.String(length=200), nullable=False, server_default=_EXISTING_KEYS_KEEP))
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("scopes", existing_type=sa.String(length=200), server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("scopes")
