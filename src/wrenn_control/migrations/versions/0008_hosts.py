"""Hosts of a fleet (registered host agents) and the host of each capsule.

`capsules.host_id` NULL means the in-process host of `wrenn server`. `capsules.claimed_by` /
`claimed_until`: a lifecycle call's lease across control-plane replicas (operations.py).
`worker_passes`: which replica does a background pass (workers/passes.py).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("address", sa.String(300), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("vcpus", sa.Integer(), nullable=True),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column("disk_mb", sa.Integer(), nullable=True),
        sa.Column("usage", sa.JSON(), nullable=True),
        sa.Column("templates", sa.JSON(), nullable=True),
        sa.Column("accelerator", sa.String(16), nullable=True),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("token_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("credential_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("control_token", sa.String(128), nullable=True),
        sa.Column("last_heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_hosts_status", "hosts", ["status"])
    # Plain ADD COLUMN: a batch copy of `capsules` on SQLite would cascade deletes into its runs
    # and metrics. No foreign key (SQLite cannot add one without that copy); DELETE /v1/hosts
    # refuses while a host holds capsules.
    op.add_column("capsules", sa.Column("host_id", sa.String(40), nullable=True))
    op.add_column("capsules", sa.Column("claimed_by", sa.String(64), nullable=True))
    op.add_column("capsules", sa.Column("claimed_until", sa.DateTime(), nullable=True))
    op.create_index("ix_capsules_host_id", "capsules", ["host_id"])
    op.create_table(
        "worker_passes",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("slot", sa.BigInteger(), primary_key=True),
        sa.Column("claimed_by", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("worker_passes")
    op.drop_index("ix_capsules_host_id", table_name="capsules")
    op.drop_column("capsules", "claimed_until")
    op.drop_column("capsules", "claimed_by")
    op.drop_column("capsules", "host_id")
    op.drop_index("ix_hosts_status", table_name="hosts")
    op.drop_table("hosts")
