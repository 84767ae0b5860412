"""Observability: capsule_runs (usage), capsule_metrics and team_stats_samples (the sampler's).

Capsules already running when this runs get an open run from their `started_at`, so their usage
counts from then on.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "capsule_runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("capsule_id", sa.String(32), sa.ForeignKey("capsules.id", ondelete="CASCADE"), nullable=False),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_capsule_runs_capsule_id", "capsule_runs", ["capsule_id"])
    op.create_index("ix_capsule_runs_team_started", "capsule_runs", ["team_id", "started_at"])
    op.create_table(
        "capsule_metrics",
        sa.Column("capsule_id", sa.String(32), sa.ForeignKey("capsules.id", ondelete="CASCADE"), nullable=False),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
        sa.Column("cpu_pct", sa.Float(), nullable=True),
        sa.Column("mem_bytes", sa.BigInteger(), nullable=True),
        sa.Column("disk_bytes", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("capsule_id", "ts_ms"),
    )
    op.create_index("ix_capsule_metrics_ts", "capsule_metrics", ["ts_ms"])
    op.create_table(
        "team_stats_samples",
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
        sa.Column("running_count", sa.Integer(), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("team_id", "ts_ms"),
    )
    op.create_index("ix_team_stats_samples_ts", "team_stats_samples", ["ts_ms"])
    # Capsules running right now: their run began when they last became running.
    op.execute(
        "INSERT INTO capsule_runs (capsule_id, team_id, vcpus, memory_mb, started_at) "
        "SELECT id, team_id, vcpus, memory_mb, COALESCE(started_at, last_updated) FROM capsules "
        "WHERE status = 'running'"
    )


def downgrade() -> None:
    op.drop_index("ix_team_stats_samples_ts", table_name="team_stats_samples")
    op.drop_table("team_stats_samples")
    op.drop_index("ix_capsule_metrics_ts", table_name="capsule_metrics")
    op.drop_table("capsule_metrics")
    op.drop_index("ix_capsule_runs_team_started", table_name="capsule_runs")
    op.drop_index("ix_capsule_runs_capsule_id", table_name="capsule_runs")
    op.drop_table("capsule_runs")
