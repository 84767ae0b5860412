"""Builds: which control-plane replica runs each one, under a lease it renews (builds/manager.py).

A replica that stops lets its leases lapse; any replica then ends those builds as failed, and
the build capsules they left on hosts are destroyed at the hosts' next heartbeat.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("builds") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(128), nullable=True))
        batch.add_column(sa.Column("claimed_until", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("builds") as batch:
        batch.drop_column("claimed_until")
        batch.drop_column("claimed_by")
