"""fleet truth: server receive times, device clock offset and invalid-report counts, per-rollout step errors,
the package's drift reference

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 08:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_NOW = sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as b:
        b.add_column(sa.Column("drift_reference", sa.JSON(), nullable=True))
    with op.batch_alter_table("devices", schema=None) as b:
        b.add_column(sa.Column("clock_offset_s", sa.Float(), nullable=True))
        b.add_column(sa.Column("invalid_reports", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("last_invalid_report", sa.Text(), nullable=True))
        b.add_column(sa.Column("last_invalid_at", sa.DateTime(timezone=True), nullable=True))
    # rows stored before this revision get the time of the upgrade: older than anything received after it
    for table in ("update_events", "telemetry"):
        with op.batch_alter_table(table, schema=None) as b:
            b.add_column(sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW))
            b.create_index(b.f(f"ix_{table}_received_at"), ["received_at"], unique=False)
    with op.batch_alter_table("rollouts", schema=None) as b:
        b.add_column(sa.Column("step_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollouts", schema=None) as b:
        b.drop_column("step_error")
    for table in ("telemetry", "update_events"):
        with op.batch_alter_table(table, schema=None) as b:
            b.drop_index(b.f(f"ix_{table}_received_at"))
            b.drop_column("received_at")
    with op.batch_alter_table("devices", schema=None) as b:
        b.drop_column("last_invalid_at")
        b.drop_column("last_invalid_report")
        b.drop_column("invalid_reports")
        b.drop_column("clock_offset_s")
    with op.batch_alter_table("model_versions", schema=None) as b:
        b.drop_column("drift_reference")
