"""Alembic's entry point: runs the migrations on the connection the caller passes in
``config.attributes["connection"]`` (``migrations.upgrade``), inside its transaction."""

from __future__ import annotations

from alembic import context

from dagster_taskiq.core.schema import VERSION_TABLE

connection = context.config.attributes["connection"]
# The version table is our own: Dagster's storage, often in the same database, keeps
# its revision in Alembic's default ``alembic_version``.
context.configure(connection=connection, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
