"""job recipe

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Stage 2's recipe. Jobs that predate it ran what is now the "paper" recipe (the worker passed
    # 50 prompt tokens and no pseudo-label balancing), so existing rows read "paper"; the API sets
    # the column on every new job.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("recipe", sa.String(length=16), server_default="paper", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("recipe")
