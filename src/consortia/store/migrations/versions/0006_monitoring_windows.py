"""monitoring windows sent by serving agents

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 09:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "monitoring_windows",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("release", sa.String(length=200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("monitoring_windows", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_monitoring_windows_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_monitoring_windows_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_monitoring_windows_release"), ["release"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("monitoring_windows", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_monitoring_windows_release"))
        batch_op.drop_index(batch_op.f("ix_monitoring_windows_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_monitoring_windows_device_id"))
    op.drop_table("monitoring_windows")
