"""Limits: per-team quota overrides (null: the server's defaults).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = ("max_capsules", "max_vcpus", "max_memory_mb")


def upgrade() -> None:
    # Plain ADD COLUMN: a batch copy of `teams` on SQLite would cascade into every team's rows.
    for name in COLUMNS:
        op.add_column("teams", sa.Column(name, sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        for name in COLUMNS:
            batch.drop_column(name)
