"""runs.status and model_versions.stage take awaiting_approval

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

An approval gate (`promotion.approval` in a spec, flows/approvals.py) leaves a run
`awaiting_approval` and its candidate version at the stage of the same name: 17 characters, one more
than the 16 both columns held. Both become VARCHAR(32).

SQLite changes a column's type by copying the table, and dropping the old `runs` or
`model_versions` with foreign keys enforced would fire the ON DELETE actions of the tables that
point at them (run_events, alias_history, rollouts, …). So the copy runs with foreign keys off, as
SQLite's own procedure for table changes says (committing first what the revisions before it
wrote: SQLite ignores the switch inside a transaction), and checks every foreign key after.

The downgrade cannot store the longer value in 16 characters: it rejects each run still waiting
(fail closed, the reason naming this downgrade) and its candidate, then narrows the columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WAITING = "awaiting_approval"
_COLUMNS = (("runs", "status"), ("model_versions", "stage"))


@contextmanager
def _foreign_keys_off() -> Iterator[None]:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        yield
        return
    driver = bind.connection.dbapi_connection
    assert driver is not None
    # SQLite ignores the switch inside a transaction, and the driver opened one at the previous
    # revision's alembic_version write: end it (the revisions before this one are complete).
    driver.commit()
    op.execute("PRAGMA foreign_keys=OFF")
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError("revision 0008 needs SQLite's foreign keys off to copy runs and model_versions")
    try:
        yield
        problems = bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if problems:
            raise RuntimeError(f"revision 0008 left rows whose foreign keys point nowhere: {problems[:5]}")
        driver.commit()
    finally:
        op.execute("PRAGMA foreign_keys=ON")


def _resize(length_from: int, length_to: int) -> None:
    with _foreign_keys_off():
        for table, column in _COLUMNS:
            with op.batch_alter_table(table) as batch:
                batch.alter_column(
                    column, existing_type=sa.String(length=length_from), type_=sa.String(length=length_to)
                )


def upgrade() -> None:
    _resize(16, 32)


def downgrade() -> None:
    runs = sa.table("runs", sa.column("status"), sa.column("error"), sa.column("finished_at", sa.DateTime))
    versions = sa.table("model_versions", sa.column("stage"))
    op.execute(
        runs.update()
        .where(runs.c.status == _WAITING)
        .values(
            status="rejected",
            error="rejected while awaiting approval: the database was downgraded below revision 0008",
            finished_at=sa.func.current_timestamp(),
        )
    )
    op.execute(versions.update().where(versions.c.stage == _WAITING).values(stage="rejected"))
    _resize(32, 16)
