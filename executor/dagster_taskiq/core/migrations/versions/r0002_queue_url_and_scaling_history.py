"""Routing and the scaler: the queue each step was sent to, and the scaler's decisions.

Releases before versioned schemas created these with ``CREATE TABLE IF NOT EXISTS`` as
they were needed, so a ledger stamped at the baseline may have some of them already:
each is added only where it is missing.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    columns = {c["name"] for c in inspector.get_columns("dagster_taskiq_steps")}
    if "queue_url" not in columns:
        # Nullable: rows of the first release were sent to the one queue there was.
        op.add_column("dagster_taskiq_steps", sa.Column("queue_url", sa.Text))
    if not inspector.has_table("dagster_taskiq_scaling_history"):
        op.create_table(
            "dagster_taskiq_scaling_history",
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
            sa.Column("service", sa.Text, nullable=False),
            sa.Column("at", sa.Float, nullable=False),
            sa.Column("recommendation", sa.Integer),
            sa.Column("current", sa.Integer, nullable=False),
            sa.Column("desired", sa.Integer, nullable=False),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("detail", sa.Text, nullable=False),
        )
        op.create_index(
            "ix_dagster_taskiq_scaling_history_service_at",
            "dagster_taskiq_scaling_history",
            ["service", "at"],
        )
