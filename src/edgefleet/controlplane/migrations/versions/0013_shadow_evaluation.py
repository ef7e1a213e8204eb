"""shadow evaluation: a rollout's shadow phase, the order on each device, and each window's shadow counts

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts", schema=None) as b:
        # rollouts stored before this revision had no shadow phase
        b.add_column(sa.Column("shadow_state", sa.String(length=16), nullable=True))
        b.add_column(sa.Column("shadow_started_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("devices", schema=None) as b:
        b.add_column(sa.Column("desired_shadow", sa.JSON(), nullable=True))
    with op.batch_alter_table("telemetry", schema=None) as b:
        b.add_column(sa.Column("shadow", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("telemetry", schema=None) as b:
        b.drop_column("shadow")
    with op.batch_alter_table("devices", schema=None) as b:
        b.drop_column("desired_shadow")
    with op.batch_alter_table("rollouts", schema=None) as b:
        b.drop_column("shadow_started_at")
        b.drop_column("shadow_state")
