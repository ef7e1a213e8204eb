"""remote diagnostics: the worker crash reports devices upload

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_crashes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("crash_id", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("signal", sa.String(length=64), nullable=True),
        sa.Column("fault", sa.Text(), nullable=False),
        sa.Column("fault_dropped", sa.Integer(), nullable=False),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=True),
        sa.Column("rss_age_s", sa.Float(), nullable=True),
        sa.Column("uptime_s", sa.Float(), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("runtime_version", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "crash_id", name="uq_device_crash"),
    )
    with op.batch_alter_table("device_crashes", schema=None) as b:
        b.create_index(b.f("ix_device_crashes_device_id"), ["device_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("device_crashes", schema=None) as b:
        b.drop_index(b.f("ix_device_crashes_device_id"))
    op.drop_table("device_crashes")
