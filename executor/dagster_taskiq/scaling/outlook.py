"""What the scaler reads beyond the queues: the steps runs will launch next, and how long
steps take.

The executor records, per run and queue, how many steps the run will launch once the steps
it is running end (from its execution plan), and since when it has been waiting for them;
the scaler counts those due within a worker's start as expected backlog. A row expires
unless the executor refreshes it, so a run worker that died leaves nothing behind for long.
The typical step duration per pool comes from the ledger's finished steps.

Dagster-free: the scaler Lambda imports it. The table sits next to the ledger's and is
created by the ledger's migrations (revision 0003).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa

from dagster_taskiq.core.ledger import Ledger, Status, steps
from dagster_taskiq.scaling.policy import ExpectedSteps

outlook_metadata = sa.MetaData()
expected_steps = sa.Table(
    "dagster_taskiq_expected_steps",
    outlook_metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("queue_url", sa.Text, primary_key=True),
    sa.Column("steps", sa.Integer, nullable=False),
    # When the last of the steps they wait on was launched (database clock).
    sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)

NOW = sa.func.now()
# A row not refreshed for this long belongs to a run worker that is gone.
EXPECTED_TTL_SECONDS = 180.0
# The durations behind the typical step duration: the last day's finished steps.
DURATION_HISTORY_SECONDS = 86_400.0


def _interval(seconds: float) -> sa.ColumnElement[object]:
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.cast(seconds, sa.Float))


class OutlookStore:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def record(
        self,
        run_id: str,
        counts: Mapping[str, ExpectedSteps],
        *,
        ttl_seconds: float = EXPECTED_TTL_SECONDS,
    ) -> None:
        """Replace the run's rows with ``counts``: queue URL -> the steps the run will launch
        on it next, and how long it has waited for the steps they wait on."""
        with self._ledger.transaction() as conn:
            conn.execute(sa.delete(expected_steps).where(expected_steps.c.run_id == run_id))
            rows = [
                {
                    "run_id": run_id,
                    "queue_url": url,
                    "steps": outlook.steps,
                    "waiting_since": NOW - _interval(max(0.0, outlook.waiting_seconds)),
                    "updated_at": NOW,
                    "expires_at": NOW + _interval(ttl_seconds),
                }
                for url, outlook in counts.items()
                if outlook.steps > 0
            ]
            for row in rows:
                conn.execute(expected_steps.insert().values(**row))

    def clear(self, run_id: str) -> None:
        with self._ledger.transaction() as conn:
            conn.execute(sa.delete(expected_steps).where(expected_steps.c.run_id == run_id))

    def expected(self, queue_urls: Sequence[str]) -> list[ExpectedSteps]:
        """The live rows of these queues, one per run and queue. Expired rows are deleted."""
        waited = sa.func.extract("epoch", NOW - expected_steps.c.waiting_since)
        with self._ledger.transaction() as conn:
            conn.execute(sa.delete(expected_steps).where(expected_steps.c.expires_at <= NOW))
            rows = conn.execute(
                sa.select(expected_steps.c.steps, waited.label("waiting")).where(
                    expected_steps.c.queue_url.in_(list(queue_urls))
                )
            ).all()
        return [ExpectedSteps(int(r.steps), float(r.waiting)) for r in rows]

    def mean_step_seconds(
        self, queue_urls: Sequence[str], *, history_seconds: float = DURATION_HISTORY_SECONDS
    ) -> float | None:
        """Mean duration of the steps that ended on these queues lately; None for none."""
        duration = sa.func.extract("epoch", steps.c.finished_at - steps.c.started_at)
        stmt = sa.select(sa.func.avg(duration)).where(
            steps.c.queue_url.in_(list(queue_urls)),
            steps.c.status.in_([Status.SUCCEEDED, Status.FAILED]),
            steps.c.started_at.is_not(None),
            steps.c.finished_at >= NOW - _interval(history_seconds),
        )
        with self._ledger.transaction() as conn:
            found = conn.execute(stmt).scalar_one()
        if found is None:
            return None
        seconds = float(found)
        return seconds if seconds > 0 else None
