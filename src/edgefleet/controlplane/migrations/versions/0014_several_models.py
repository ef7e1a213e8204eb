"""several models per device: each device's additional model assignments, their reported status, and whether its
agent serves additional models

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs, not a batch: on SQLite a batch would rebuild `devices` (DROP TABLE), which the telemetry,
    # events and rollout rows that reference a device refuse while foreign keys are enforced.
    op.add_column("devices", sa.Column("desired_models", sa.JSON(), nullable=True))
    op.add_column("devices", sa.Column("reported_models", sa.JSON(), nullable=True))
    # no agent before this revision declared that it serves additional models
    op.add_column("devices", sa.Column("several_models", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as b:
        b.drop_column("several_models")
        b.drop_column("reported_models")
        b.drop_column("desired_models")
