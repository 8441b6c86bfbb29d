"""The ledger's own history as a workload: real arrivals and durations of the last days.

The ledger keeps a finished step's row for ``idempotency_key_ttl`` (a day by default), so
the history reaches back that far at most; raise the TTL to simulate longer periods.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from dagster_taskiq.core.ledger import Ledger, steps
from dagster_taskiq.scaling.simulation.workload import StepRow


def read_history(
    database_url: str, *, days: float, queue_urls: Sequence[str] = ()
) -> list[StepRow]:
    """Every step attempt that started and finished in the last ``days`` days."""
    ledger = Ledger(database_url, pool_size=1)
    try:
        since = sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, days * 86_400.0)
        query = sa.select(
            steps.c.run_id, steps.c.enqueued_at, steps.c.started_at, steps.c.finished_at
        ).where(
            steps.c.enqueued_at >= since,
            steps.c.started_at.is_not(None),
            steps.c.finished_at.is_not(None),
        )
        if queue_urls:
            query = query.where(steps.c.queue_url.in_(list(queue_urls)))
        with ledger.transaction() as conn:
            rows = conn.execute(query.order_by(steps.c.enqueued_at)).all()
    finally:
        ledger.dispose()
    return [StepRow(r.run_id, r.enqueued_at, r.started_at, r.finished_at) for r in rows]
