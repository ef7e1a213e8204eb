"""remote diagnostics: operators' requests for a device's log lines, and the uploads that answer them

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as b:
        b.add_column(sa.Column("logs_requested_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("logs_since", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "device_logs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lines", sa.JSON(), nullable=False),
        sa.Column("dropped", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("device_logs", schema=None) as b:
        b.create_index(b.f("ix_device_logs_device_id"), ["device_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("device_logs", schema=None) as b:
        b.drop_index(b.f("ix_device_logs_device_id"))
    op.drop_table("device_logs")
    with op.batch_alter_table("devices", schema=None) as b:
        b.drop_column("logs_since")
        b.drop_column("logs_requested_at")
