"""The ledger as the first release created it: step attempts and rejected messages.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dagster_taskiq_steps",
        sa.Column("idempotency_key", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("step_key", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("worker_id", sa.Text),
        sa.Column("fencing_token", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("deliveries", sa.Integer, nullable=False, server_default="0"),
        sa.Column("duplicates_suppressed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("payload_hash", sa.Text, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_dagster_taskiq_steps_run_id", "dagster_taskiq_steps", ["run_id"])
    op.create_index(
        "ix_dagster_taskiq_steps_status_lease",
        "dagster_taskiq_steps",
        ["status", "lease_expires_at"],
    )
    op.create_table(
        "dagster_taskiq_rejected_messages",
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("body_excerpt", sa.Text, nullable=False),
        sa.Column("worker_id", sa.Text),
        sa.Column("receive_count", sa.Integer, nullable=False, server_default="1"),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    )
