"""telemetry rollups (version × tier × 5-minute bucket), each device's latest window and crash times, job leases,
and an index for pruning report batches by age

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 21:00:00
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
        "telemetry_rollups",
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("tier", sa.String(length=64), nullable=False),
        sa.Column("stripe", sa.Integer(), nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("worker_crashes", sa.BigInteger(), nullable=False),
        sa.Column("latency", sa.JSON(), nullable=False),
        sa.Column("drift", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("bucket", "model", "version", "tier", "stripe"),
    )
    op.create_table(
        "job_leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_result", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("devices", schema=None) as b:
        b.add_column(sa.Column("last_window_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("last_crash_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("report_batches", schema=None) as b:
        b.create_index(b.f("ix_report_batches_received_at"), ["received_at"], unique=False)
    # Windows stored before this revision have no rollup: sum them in now, so the KPIs read the same after the
    # upgrade (and the devices' latest window and crash times with them).
    from edgefleet.controlplane.rollups import backfill

    backfill(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("report_batches", schema=None) as b:
        b.drop_index(b.f("ix_report_batches_received_at"))
    with op.batch_alter_table("devices", schema=None) as b:
        b.drop_column("last_crash_at")
        b.drop_column("last_window_at")
    op.drop_table("job_leases")
    op.drop_table("telemetry_rollups")
