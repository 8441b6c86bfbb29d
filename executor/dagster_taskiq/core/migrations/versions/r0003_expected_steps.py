"""Predictive scale-out: the steps each run will launch next, per queue.

A release between the previous revision and this one may have created the table on
demand, so it is added only where it is missing.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("dagster_taskiq_expected_steps"):
        return
    op.create_table(
        "dagster_taskiq_expected_steps",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("queue_url", sa.Text, primary_key=True),
        sa.Column("steps", sa.Integer, nullable=False),
        sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
