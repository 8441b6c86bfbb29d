"""Steps that no worker can complete end in the DLQ, as failed steps with an alert."""

from __future__ import annotations

import json

import pytest
from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable

from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.dead_letters.processor import Outcome
from dagster_taskiq.load.faults import DuplicatingRelay
from dagster_taskiq.local.stack import LocalStack
from tests import jobs
from tests.conftest import StackFactory, start_workers
from tests.helpers import step_events, wait_for


def alerts(stack: LocalStack) -> list[str]:
    inbox = SqsQueue(stack.alerts_queue_url, endpoint_url=stack.sqs_endpoint)
    return [m.body for m in inbox.receive(max_messages=10, wait_seconds=1, visibility_timeout=60)]


@pytest.mark.slow  # a long fault run: `make test-slow`
def test_a_step_that_kills_its_worker_every_time_is_dead_lettered(
    make_stack: StackFactory, ledger: Ledger
) -> None:
    with make_stack(max_receive_count=3) as stack:
        instance = DagsterInstance.get()
        start_workers(stack, 2)
        consumer = stack.process_dead_letters(dagster_ui_url="http://dagster.example")
        result = execute_job(
            reconstructable(jobs.killer_job),
            instance=instance,
            run_config={"execution": {"config": {"health_check_interval": 1}}},
            raise_on_error=False,
        )

        assert not result.success
        (failure,) = step_events(instance, result.run_id, DagsterEventType.STEP_FAILURE)
        error = failure.step_failure_data.error
        assert error is not None
        assert "was dead-lettered after 3 deliveries" in error.message
        starts = [r for r in jobs.execution_rows(result.run_id) if r["phase"] == "start"]
        assert len(starts) == 3, "delivered max_receive_count times"
        record = ledger.get(f"{result.run_id}:kills_its_worker:0")
        assert record is not None and record.status is Status.DEAD_LETTERED
        assert record.deliveries == 3
        assert [r.outcome for r in consumer.results] == [Outcome.MARKED]

        (alert,) = wait_for(lambda: alerts(stack), timeout=20, what="the SNS alert")
        assert result.run_id in alert and "kills_its_worker" in alert
        assert "3 deliveries" in alert
        assert f"http://dagster.example/runs/{result.run_id}" in alert


def test_a_dead_letter_for_a_completed_step_is_not_marked_and_raises_no_alert(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    with DuplicatingRelay(stack, copies=1) as tee:
        start_workers(stack, 1, args=("--queue-url", tee.workers_queue_url))
        result = execute_job(reconstructable(jobs.outputs_job), instance=instance)
    assert result.success
    consumer = stack.process_dead_letters()
    # A delete was lost: the message of a finished step reaches the DLQ anyway.
    body = tee.bodies[0]
    SqsQueue(stack.dlq_url, endpoint_url=stack.sqs_endpoint).send(body)

    wait_for(lambda: consumer.results, timeout=20, what="the dead letter to be processed")
    assert [r.outcome for r in consumer.results] == [Outcome.ALREADY_TERMINAL]
    record = ledger.get(json.loads(body)["idempotency_key"])
    assert record is not None and record.status is Status.SUCCEEDED
    assert alerts(stack) == []


def test_a_step_no_worker_picks_up_fails_after_the_pickup_timeout(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    # No worker at all.
    result = execute_job(
        reconstructable(jobs.outputs_job),
        instance=instance,
        run_config={"execution": {"config": {"pickup_timeout": 2, "health_check_interval": 1}}},
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = step_events(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    error = failure.step_failure_data.error
    assert error is not None
    assert "was not picked up by any worker within 2 s" in error.message
    assert stack.queue_url in error.message
    (record,) = ledger.for_run(result.run_id)
    # Closed in the ledger: a worker that starts later will not run it.
    assert record.status is Status.FAILED
