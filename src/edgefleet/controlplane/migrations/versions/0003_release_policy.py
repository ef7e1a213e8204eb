"""release policy: the global default and per-model overrides, and the release evidence of each version

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # no row means the built-in default (a passing gate verdict bound to the package is required)
    op.create_table(
        "release_policies",
        sa.Column("scope", sa.String(length=128), nullable=False),
        sa.Column("require_gate", sa.Boolean(), nullable=True),
        sa.Column("require_bench", sa.Boolean(), nullable=True),
        sa.Column("updated_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope"),
    )
    # versions registered before this revision have no evidence record: a verdict they carry counts as naming no
    # package, so it can block a release but never let one through
    with op.batch_alter_table("model_versions", schema=None) as b:
        b.add_column(sa.Column("evidence", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as b:
        b.drop_column("evidence")
    op.drop_table("release_policies")
