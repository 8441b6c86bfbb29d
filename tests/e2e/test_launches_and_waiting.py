"""Batched launches and the run worker's event-driven wait, through real runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable
from sqlalchemy.engine.default import DefaultDialect

from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.core.sqs import sqs_client
from dagster_taskiq.local.stack import LocalStack
from tests import jobs
from tests.conftest import start_workers
from tests.helpers import finished_records, step_events


def _executor(**config: Any) -> dict[str, Any]:
    return {"execution": {"config": config}}


def test_steps_made_ready_together_are_recorded_and_sent_together(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    start_workers(stack, 1)
    with execute_job(reconstructable(jobs.fanout_job), instance=instance) as result:
        assert result.success
    records = finished_records(ledger, result.run_id)
    assert len(records) == 5
    # One multi-row insert: one statement, one transaction time.
    assert len({r.enqueued_at for r in records}) == 1
    queued = step_events(instance, result.run_id, DagsterEventType.STEP_WORKER_STARTING)
    message_ids = {e.engine_event_data.metadata["message_id"].value for e in queued}
    assert len(queued) == 5 and len(message_ids) == 5

    # One at a time, as before: an insert each.
    with execute_job(
        reconstructable(jobs.fanout_job),
        instance=instance,
        run_config=_executor(batch_launches=False),
    ) as result:
        assert result.success
    records = finished_records(ledger, result.run_id)
    assert len({r.enqueued_at for r in records}) == 5


def test_a_send_that_fails_after_launch_fails_the_step_with_sqs_s_reason(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    # A queue that refuses the executor's messages (SQS's smallest maximum size), which
    # the run start's checks cannot see: the sends fail after launch_step has returned.
    client = sqs_client(region="us-east-1", endpoint_url=stack.sqs_endpoint)
    small = client.create_queue(
        QueueName=f"small-{time.monotonic_ns()}", Attributes={"MaximumMessageSize": "1024"}
    )["QueueUrl"]
    result = execute_job(
        reconstructable(jobs.fanout_job),
        instance=instance,
        run_config=_executor(queue_url=small, unreachable_retry_seconds=1, health_check_interval=1),
        raise_on_error=False,
    )
    assert not result.success
    failures = step_events(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    assert len(failures) == 5
    for failure in failures:
        error = failure.step_failure_data.error
        assert error is not None
        assert "failed health check" in error.message
        assert "The step message could not be sent" in error.message
        assert "SendMessageBatch" in error.message
    records = {r.step_key: r for r in ledger.for_run(result.run_id)}
    assert all(r.status is Status.FAILED for r in records.values())
    assert all("SendMessageBatch" in (r.error or "") for r in records.values())
    told = [
        e.message or ""
        for e in step_events(instance, result.run_id, DagsterEventType.ENGINE_EVENT)
        if e.step_key is not None
    ]
    assert sum("could not be queued" in m for m in told) == 5


@pytest.fixture
def statements() -> Iterator[list[float]]:
    """The times of the statements this process (the run worker) sends: each cursor
    execute, and each check of a pooled connection before use."""
    stamps: list[float] = []

    def executed(*_: object) -> None:
        stamps.append(time.time())

    ping = DefaultDialect._do_ping_w_event

    def counted_ping(self: DefaultDialect, dbapi_connection: Any) -> bool:
        stamps.append(time.time())
        return ping(self, dbapi_connection)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", executed)
    DefaultDialect._do_ping_w_event = counted_ping  # type: ignore[method-assign]
    try:
        yield stamps
    finally:
        DefaultDialect._do_ping_w_event = ping  # type: ignore[method-assign]
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", executed)


def test_a_run_waiting_on_a_long_step_sends_about_no_statements(
    stack: LocalStack, instance: DagsterInstance, statements: list[float]
) -> None:
    start_workers(stack, 1)
    seconds = 6.0
    with execute_job(
        reconstructable(jobs.slow_job),
        instance=instance,
        run_config={"ops": {"slow": {"config": {"seconds": seconds}}}},
    ) as result:
        assert result.success
    (started,) = step_events(instance, result.run_id, DagsterEventType.STEP_START)
    records = instance.get_records_for_run(result.run_id, limit=1000).records
    start = next(r for r in records if r.event_log_entry.dagster_event == started)
    low = start.event_log_entry.timestamp + 1.0
    high = low + seconds - 2.0
    waiting = [s for s in statements if low <= s <= high]
    # Polling every 0.1 s sent some 20 a second; listening, a read at least every 5 s.
    assert len(waiting) / (high - low) <= 1.0, waiting


def test_a_dynamic_fan_out_collects_every_value(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    # Each mapped step's message carries the one output it reads, not all of the run's;
    # the fan-in still finds every value (it raises if one is missing).
    start_workers(stack, 2)
    width = 40
    config = {"ops": {name: {"config": {"width": width}} for name in ("spread", "gather")}}
    with execute_job(
        reconstructable(jobs.dynamic_fanout_job), instance=instance, run_config=config
    ) as result:
        assert result.success
    assert len(finished_records(ledger, result.run_id)) == width + 2
