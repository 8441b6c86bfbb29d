"""What Dagster's event log says about one attempt of one step.

Each attempt of a step ends with exactly one of STEP_SUCCESS, STEP_FAILURE or
STEP_UP_FOR_RETRY, so attempt ``k`` (0-based) has ended when there are more than ``k`` of
them. The executor's health check and the worker's takeover both read this: the event
log, not the ledger, is where Dagster learns a step's outcome.

On SQL event storage (dagster-postgres) only the step's own endings are read, through the
event log's step-key index: reading every ending of the run and keeping one step's was
a cost in proportion to the run's size, paid by every health check of every in-flight
step (a run of N steps, O(N²) per health-check round).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import sqlalchemy as sa
from dagster import DagsterEvent, DagsterEventType, DagsterInstance, EventLogEntry
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._serdes import deserialize_value

_ENDINGS = {
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
}


class AttemptOutcome(Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed for good, or up for retry: this attempt is over either way


def attempt_outcome(
    instance: DagsterInstance, run_id: str, step_key: str, attempt: int
) -> AttemptOutcome | None:
    """The recorded ending of the attempt, or None while it has none."""
    endings = step_endings(instance, run_id, step_key)
    if len(endings) <= attempt:
        return None
    event = endings[attempt]
    if event is not None and event.event_type == DagsterEventType.STEP_SUCCESS:
        return AttemptOutcome.SUCCEEDED
    return AttemptOutcome.FAILED


def run_endings(instance: DagsterInstance, run_id: str) -> dict[str, int] | None:
    """How many endings each step of the run has in the event log, from one read of the
    event log's type and step columns (no event is deserialized); None where the event
    log is not SQL storage.

    A health-check round reads this once for every step whose ledger row has ended: a
    run worker that lags behind its workers (a 10,000-step fan-out its workers finish
    faster than it consumes the events) asks about thousands of such steps each round,
    and a read per step made each round slower than the last.
    """
    storage = instance.event_log_storage
    if not isinstance(storage, SqlEventLogStorage):
        return None
    table = SqlEventLogStorageTable
    query = (
        sa.select(table.c.step_key, sa.func.count())
        .where(
            table.c.run_id == run_id,
            table.c.dagster_event_type.in_([t.value for t in _ENDINGS]),
        )
        .group_by(table.c.step_key)
    )
    with storage.run_connection(run_id) as conn:
        return {str(step_key): int(count) for step_key, count in conn.execute(query)}


def step_endings(instance: DagsterInstance, run_id: str, step_key: str) -> list[DagsterEvent]:
    """The step's endings in the event log, oldest first: one per attempt that ended."""
    storage = instance.event_log_storage
    if isinstance(storage, SqlEventLogStorage):
        table = SqlEventLogStorageTable
        query = (
            sa.select(table.c.event)
            .where(
                table.c.run_id == run_id,
                table.c.step_key == step_key,
                table.c.dagster_event_type.in_([t.value for t in _ENDINGS]),
            )
            .order_by(table.c.id.asc())
        )
        with storage.run_connection(run_id) as conn:
            texts: Sequence[str] = conn.execute(query).scalars().all()
        entries = [deserialize_value(text, EventLogEntry) for text in texts]
    else:
        records = instance.get_records_for_run(run_id, of_type=_ENDINGS, limit=100_000).records
        entries = [r.event_log_entry for r in records]
    return [
        e.dagster_event
        for e in entries
        if e.dagster_event is not None and e.dagster_event.step_key == step_key
    ]
