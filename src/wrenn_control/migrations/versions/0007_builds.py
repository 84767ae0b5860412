"""Template builds and their step cache.

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "builds",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("base_template", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current_step", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("logs", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("template_id", sa.String(64), nullable=True),
        sa.Column("cached_steps", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_builds_team_created", "builds", ["team_id", "created_at"])
    op.create_index("ix_builds_status", "builds", ["status"])
    op.create_table(
        "build_layers",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
        sa.Column("template_id", sa.String(64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_build_layers_team_id", "build_layers", ["team_id"])


def downgrade() -> None:
    op.drop_index("ix_build_layers_team_id", table_name="build_layers")
    op.drop_table("build_layers")
    op.drop_index("ix_builds_status", table_name="builds")
    op.drop_index("ix_builds_team_created", table_name="builds")
    op.drop_table("builds")
