"""field accuracy: each telemetry window's ground-truth feedback, and its rollup per version × tier × bucket

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("telemetry", schema=None) as b:
        b.add_column(sa.Column("feedback", sa.JSON(), nullable=True))
    op.create_table(
        "field_accuracy_rollups",
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("tier", sa.String(length=64), nullable=False),
        sa.Column("stripe", sa.Integer(), nullable=False),
        sa.Column("matched", sa.BigInteger(), nullable=False),
        sa.Column("correct", sa.BigInteger(), nullable=False),
        sa.Column("unmatched", sa.BigInteger(), nullable=False),
        sa.Column("confusion", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("bucket", "model", "version", "tier", "stripe"),
    )
    # Windows stored before this revision carry no feedback: nothing to backfill.


def downgrade() -> None:
    op.drop_table("field_accuracy_rollups")
    with op.batch_alter_table("telemetry", schema=None) as b:
        b.drop_column("feedback")
