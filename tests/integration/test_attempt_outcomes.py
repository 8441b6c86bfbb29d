"""The endings of a run's steps, read from a real dagster-postgres event log: the round's
one read by step (``run_endings``) agrees with each step's own read (``step_endings``)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from dagster import DagsterEventType
from dagster._core.events import EngineEventData
from dagster._core.execution.plan.objects import StepRetryData, StepSuccessData
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_shared.error import SerializableErrorInfo

from dagster_taskiq.executor.attempt_outcomes import run_endings, step_endings
from tests.helpers import stored_entry


@pytest.fixture
def storage(event_log_storage: PostgresEventLogStorage) -> PostgresEventLogStorage:
    return event_log_storage


def _store(
    storage: PostgresEventLogStorage, run_id: str, step_key: str, kind: DagsterEventType
) -> None:
    data: Any = EngineEventData()
    # Dagster leaves the two untyped.
    if kind is DagsterEventType.STEP_SUCCESS:
        data = StepSuccessData(duration_ms=1.0)  # type: ignore[no-untyped-call]
    elif kind is DagsterEventType.STEP_UP_FOR_RETRY:
        error = SerializableErrorInfo(message="m", stack=[], cls_name=None)
        data = StepRetryData(error=error, seconds_to_wait=0)  # type: ignore[no-untyped-call]
    storage.store_event(stored_entry(run_id, kind, step_key=step_key, data=data))


def test_one_read_counts_each_step_s_endings_as_its_own_read_does(
    storage: PostgresEventLogStorage,
) -> None:
    run, other_run = str(uuid.uuid4()), str(uuid.uuid4())
    _store(storage, run, "retried", DagsterEventType.STEP_UP_FOR_RETRY)
    _store(storage, run, "retried", DagsterEventType.STEP_SUCCESS)
    _store(storage, run, "done", DagsterEventType.STEP_SUCCESS)
    _store(storage, run, "running", DagsterEventType.ENGINE_EVENT)  # not an ending
    _store(storage, other_run, "done", DagsterEventType.STEP_SUCCESS)
    instance: Any = SimpleNamespace(event_log_storage=storage)

    endings = run_endings(instance, run)

    assert endings == {"retried": 2, "done": 1}
    for step_key in ("retried", "done", "running"):
        assert endings.get(step_key, 0) == len(step_endings(instance, run, step_key))
