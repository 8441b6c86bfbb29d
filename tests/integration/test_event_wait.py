"""The event wait and the batched event writes on a real PostgreSQL: dagster-postgres's
notifications wake the waiter of the run, a cut listening connection is noticed and
replaced, and a batch of events is stored (and notified) as ``store_event`` would."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace
from typing import cast

import pytest
import sqlalchemy as sa
from dagster import DagsterEventType, DagsterInstance, EventLogRecord
from dagster_postgres.event_log import PostgresEventLogStorage

from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.executor.event_wait import RunEventWaiter, listen_connector
from dagster_taskiq.patches import EventBatch
from tests.helpers import stored_entry


@pytest.fixture
def storage(event_log_storage: PostgresEventLogStorage) -> PostgresEventLogStorage:
    return event_log_storage


def _waiter(storage: PostgresEventLogStorage, run_id: str) -> RunEventWaiter:
    connect = listen_connector(storage)
    assert connect is not None
    waiter = RunEventWaiter(connect, run_id)
    assert waiter.listening and waiter.read_due()
    return waiter


def test_a_stored_event_wakes_the_waiter_of_its_run_only(
    storage: PostgresEventLogStorage,
) -> None:
    run, other = str(uuid.uuid4()), str(uuid.uuid4())
    waiter = _waiter(storage, run)
    try:
        storage.store_event(stored_entry(other))
        started = time.monotonic()
        waiter.wait(0.5)
        assert not waiter.read_due(), "another run's event"
        assert time.monotonic() - started >= 0.45

        storage.store_event(stored_entry(run))
        started = time.monotonic()
        waiter.wait(5.0)
        assert time.monotonic() - started < 1.0, "woken by the notification"
        assert waiter.read_due()
    finally:
        waiter.close()


def test_a_cut_listening_connection_is_noticed_and_replaced(
    storage: PostgresEventLogStorage, ledger: Ledger
) -> None:
    run = str(uuid.uuid4())
    waiter = _waiter(storage, run)
    try:
        with ledger.transaction() as conn:
            cut = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query = 'LISTEN run_events' AND pid <> pg_backend_pid()"
                )
            ).all()
        assert cut, "the listening connection was found"
        started = time.monotonic()
        waiter.wait(5.0)
        assert time.monotonic() - started < 2.0
        assert waiter.read_due(), "events may have been missed: read"
        waiter.wait(3.0)  # listens again
        assert waiter.listening
        storage.store_event(stored_entry(run))
        waiter.wait(5.0)
        assert waiter.read_due()
    finally:
        waiter.close()


def test_a_batch_of_events_is_stored_and_notified_together(
    storage: PostgresEventLogStorage,
) -> None:
    run = str(uuid.uuid4())
    waiter = _waiter(storage, run)
    batch = EventBatch(cast(DagsterInstance, SimpleNamespace(event_log_storage=storage)))
    try:
        with batch.holding({DagsterEventType.ENGINE_EVENT}):
            storage.store_event(stored_entry(run))
            storage.store_event(stored_entry(run))
            storage.store_event(stored_entry(run, DagsterEventType.STEP_WORKER_STARTED))  # not held
        assert len(batch.held) == 2
        assert [r.event_log_entry.dagster_event_type for r in _records(storage, run)] == [
            DagsterEventType.STEP_WORKER_STARTED
        ]
        assert "store_event" not in vars(storage), "the storage's own method is back"
        waiter.wait(0.2)
        waiter.read_due()  # the event stored on its own

        batch.write()
        assert batch.held == []
        kinds = [r.event_log_entry.dagster_event_type for r in _records(storage, run)]
        assert kinds.count(DagsterEventType.ENGINE_EVENT) == 2
        waiter.wait(5.0)
        assert waiter.read_due(), "the batch notified"
    finally:
        waiter.close()


def _records(storage: PostgresEventLogStorage, run_id: str) -> list[EventLogRecord]:
    return list(storage.get_records_for_run(run_id, limit=100).records)
