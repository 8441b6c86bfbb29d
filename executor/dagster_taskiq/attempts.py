"""What Dagster's event log says about one attempt of one step.

Each attempt of a step ends with exactly one of STEP_SUCCESS, STEP_FAILURE or
STEP_UP_FOR_RETRY, so attempt ``k`` (0-based) has ended when there are more than ``k`` of
them. The executor's health check and the worker's takeover both read this: the event
log, not the ledger, is where Dagster learns a step's outcome.
"""

from __future__ import annotations

from enum import Enum

from dagster import DagsterEventType, DagsterInstance

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
    records = instance.get_records_for_run(run_id, of_type=_ENDINGS, limit=100_000).records
    endings = [
        r.event_log_entry.dagster_event
        for r in records
        if r.event_log_entry.dagster_event is not None
        and r.event_log_entry.dagster_event.step_key == step_key
    ]
    if len(endings) <= attempt:
        return None
    event = endings[attempt]
    if event is not None and event.event_type == DagsterEventType.STEP_SUCCESS:
        return AttemptOutcome.SUCCEEDED
    return AttemptOutcome.FAILED
