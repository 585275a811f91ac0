"""per-job event sequence numbers

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A job's events are numbered 1, 2, 3... (``seq``), the API's event id and cursor; the global
    # ``id`` stays as the key and is no longer shown. ``jobs.event_count`` hands out the numbers.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("event_count", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("seq", sa.Integer(), nullable=True))
    # Existing events keep their order: seq is their rank within the job by the old id.
    op.execute(
        "UPDATE job_events SET seq = (SELECT count(*) FROM job_events AS e "
        "WHERE e.job_id = job_events.job_id AND e.id <= job_events.id)"
    )
    op.execute(
        "UPDATE jobs SET event_count = (SELECT coalesce(max(e.seq), 0) FROM job_events AS e "
        "WHERE e.job_id = jobs.id)"
    )
    with op.batch_alter_table("job_events") as batch:
        batch.alter_column("seq", existing_type=sa.Integer(), nullable=False)
        batch.drop_index("ix_job_events_job_id_id")
        batch.create_unique_constraint(op.f("uq_job_events_job_id_seq"), ["job_id", "seq"])


def downgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.drop_constraint(op.f("uq_job_events_job_id_seq"), type_="unique")
        batch.create_index("ix_job_events_job_id_id", ["job_id", "id"], unique=False)
        batch.drop_column("seq")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("event_count")
