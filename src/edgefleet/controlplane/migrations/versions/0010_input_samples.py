"""remote diagnostics: served inputs sampled on consenting devices, encrypted there to the operator's key

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "input_samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("sample_id", sa.String(length=64), nullable=False),
        sa.Column("group", sa.String(length=128), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("envelope", sa.JSON(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("device_dropped", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "sample_id", name="uq_input_sample"),
    )
    with op.batch_alter_table("input_samples", schema=None) as b:
        b.create_index(b.f("ix_input_samples_device_id"), ["device_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("input_samples", schema=None) as b:
        b.drop_index(b.f("ix_input_samples_device_id"))
    op.drop_table("input_samples")
