"""The expected-steps table and the step durations the scaler reads, on real PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from dagster_taskiq.core.ledger import Ledger, steps
from dagster_taskiq.scaling.outlook import OutlookStore, expected_steps
from dagster_taskiq.scaling.policy import ExpectedSteps


@pytest.fixture
def store(ledger: Ledger) -> OutlookStore:
    # The ledger fixture brought the schema to this release's revision, table included.
    return OutlookStore(ledger)


def _queue() -> str:
    return f"https://sqs/{uuid.uuid4().hex[:8]}"


def test_a_runs_rows_are_replaced_read_and_cleared(store: OutlookStore) -> None:
    queue, lane, other = _queue(), _queue(), _queue()
    store.record("run-a", {queue: ExpectedSteps(12, 40.0), lane: ExpectedSteps(3, 0.0)})
    store.record("run-b", {queue: ExpectedSteps(5, 100.0), other: ExpectedSteps(7, 0.0)})

    found = sorted(store.expected([queue, lane]), key=lambda e: e.steps)
    assert [e.steps for e in found] == [3, 5, 12]
    # Waiting is measured on the database's clock from when the run began waiting.
    waited = {e.steps: e.waiting_seconds for e in found}
    assert 100 <= waited[5] < 110 and 40 <= waited[12] < 50 and 0 <= waited[3] < 10

    store.record("run-a", {queue: ExpectedSteps(2, 0.0), lane: ExpectedSteps(0, 0.0)})
    assert sorted(e.steps for e in store.expected([queue, lane])) == [2, 5]

    store.clear("run-a")
    store.clear("run-b")
    assert store.expected([queue, lane, other]) == []


def test_a_row_not_refreshed_expires(store: OutlookStore, ledger: Ledger) -> None:
    queue = _queue()
    store.record("gone", {queue: ExpectedSteps(50, 0.0)}, ttl_seconds=-1)
    store.record("alive", {queue: ExpectedSteps(4, 0.0)})

    assert [e.steps for e in store.expected([queue])] == [4]
    with ledger.transaction() as conn:
        left = conn.execute(
            sa.select(expected_steps.c.run_id).where(expected_steps.c.queue_url == queue)
        ).all()
    assert [row.run_id for row in left] == ["alive"], "expired rows are deleted as read"
    store.clear("alive")


def _finished(ledger: Ledger, queue: str, seconds: float, *, status: str = "SUCCEEDED") -> None:
    key = f"{uuid.uuid4()}:step:0"
    ledger.enqueue(
        key,
        run_id="r",
        step_key="step",
        attempt=0,
        payload_hash="h",
        ttl_seconds=60,
        queue_url=queue,
    )
    claim = ledger.claim(key, worker_id="w", lease_seconds=60, payload_hash="h")
    assert ledger.complete(key, claim.fencing_token, succeeded=status == "SUCCEEDED")
    with ledger.transaction() as conn:
        conn.execute(
            sa.update(steps)
            .where(steps.c.idempotency_key == key)
            .values(started_at=steps.c.finished_at - sa.text(f"interval '{seconds} seconds'"))
        )


def test_the_mean_step_duration_of_a_pools_queues(store: OutlookStore, ledger: Ledger) -> None:
    queue, lane, other = _queue(), _queue(), _queue()
    assert store.mean_step_seconds([queue]) is None
    _finished(ledger, queue, 20.0)
    _finished(ledger, lane, 40.0, status="FAILED")
    _finished(ledger, other, 600.0)

    mean = store.mean_step_seconds([queue, lane])
    assert mean == pytest.approx(30.0, abs=0.5)
    # Only the last day's steps count.
    assert store.mean_step_seconds([queue, lane], history_seconds=0) is None
