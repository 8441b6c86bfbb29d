"""The Dagster instance's storage, as the executor and the workers find it.

How its connections are pooled and checked, and how its event writes are batched, changes
Dagster's internals: that is in ``dagster_taskiq.patches``, with every other such change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dagster import DagsterInstance


def instance_postgres_url(instance: DagsterInstance) -> str | None:
    """The PostgreSQL URL of a Dagster instance's run storage (dagster-postgres), if it has one:
    the ledger's default database, for the run worker and the step workers alike."""
    url = getattr(instance.run_storage, "postgres_url", None)
    return url if isinstance(url, str) else None
