"""device lifecycle: decommission, credential and device-key rotation, the TUF root an enrollment token pins

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as b:
        b.add_column(sa.Column("decommissioned_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("wipe_sent_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("credential_rotation_requested_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("pending_credential_hash", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("key_rotation_requested_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("previous_public_key", sa.String(length=64), nullable=True))
        b.create_index(b.f("ix_devices_pending_credential_hash"), ["pending_credential_hash"], unique=True)
    # tokens minted before this revision pin nothing: the device trusts the root the enroll answer carries
    with op.batch_alter_table("enrollment_tokens", schema=None) as b:
        b.add_column(sa.Column("root_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("enrollment_tokens", schema=None) as b:
        b.drop_column("root_version")
    with op.batch_alter_table("devices", schema=None) as b:
        b.drop_index(b.f("ix_devices_pending_credential_hash"))
        b.drop_column("previous_public_key")
        b.drop_column("key_rotation_requested_at")
        b.drop_column("pending_credential_hash")
        b.drop_column("credential_rotation_requested_at")
        b.drop_column("wipe_sent_at")
        b.drop_column("decommissioned_at")
