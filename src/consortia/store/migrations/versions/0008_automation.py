"""automation policies and their runs

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 11:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "automation_policies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("model", sa.String(length=63), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "revision", name="uq_automation_policy_revision"),
    )
    with op.batch_alter_table("automation_policies", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_automation_policies_name"), ["name"], unique=False)
        batch_op.create_index(batch_op.f("ix_automation_policies_model"), ["model"], unique=False)
    op.create_table(
        "automation_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("policy", sa.String(length=63), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=63), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("trigger", sa.JSON(), nullable=False),
        sa.Column("tenants", sa.JSON(), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("automation_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_automation_runs_policy"), ["policy"], unique=False)
        batch_op.create_index(batch_op.f("ix_automation_runs_model"), ["model"], unique=False)
        batch_op.create_index(batch_op.f("ix_automation_runs_state"), ["state"], unique=False)


def downgrade() -> None:
    op.drop_table("automation_runs")
    op.drop_table("automation_policies")
