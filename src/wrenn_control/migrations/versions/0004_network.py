"""Capsule egress policy: allow_internet_access and the allow_out/deny_out lists.

Capsules made before this had no network at all; they get the default (internet allowed).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, not a batch copy: on SQLite a batch recreates the table, and dropping the
    # old one would cascade into capsule_runs and the metrics.
    op.add_column("capsules", sa.Column("allow_internet_access", sa.Boolean(), nullable=False,
                                        server_default=sa.true()))
    op.add_column("capsules", sa.Column("egress", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("capsules", "egress")
    op.drop_column("capsules", "allow_internet_access")
