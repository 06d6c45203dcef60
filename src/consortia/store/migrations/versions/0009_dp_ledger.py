"""differential-privacy ledger

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 15:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dp_ledger",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("model", sa.String(length=63), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("q", sa.Float(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "model", "job_id", name="uq_dp_ledger_entry"),
    )
    with op.batch_alter_table("dp_ledger", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dp_ledger_tenant"), ["tenant"], unique=False)
        batch_op.create_index(batch_op.f("ix_dp_ledger_model"), ["model"], unique=False)
        batch_op.create_index(batch_op.f("ix_dp_ledger_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("dp_ledger", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dp_ledger_job_id"))
        batch_op.drop_index(batch_op.f("ix_dp_ledger_model"))
        batch_op.drop_index(batch_op.f("ix_dp_ledger_tenant"))
    op.drop_table("dp_ledger")
