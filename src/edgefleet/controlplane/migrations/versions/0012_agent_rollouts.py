"""agent rollouts: a rollout's kind, and the agent version a rollout gives each device

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts", schema=None) as b:
        # every rollout stored before this revision moved a model version
        b.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="model"))
    with op.batch_alter_table("devices", schema=None) as b:
        b.add_column(sa.Column("desired_agent_version", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("desired_agent_rollout_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as b:
        b.drop_column("desired_agent_rollout_id")
        b.drop_column("desired_agent_version")
    with op.batch_alter_table("rollouts", schema=None) as b:
        b.drop_column("kind")
