"""delta updates: what each update downloaded, and the version a delta rebuilt the package from

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 22:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("update_events", schema=None) as b:
        b.add_column(sa.Column("bytes_downloaded", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("delta_from", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("update_events", schema=None) as b:
        b.drop_column("delta_from")
        b.drop_column("bytes_downloaded")
