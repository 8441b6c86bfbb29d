"""No step waits for ever: a run whose step used its last delivery ends on its own, even
with the DLQ processor down; the processor, when it comes, confirms and alerts once."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from dagster import DagsterEventType, DagsterInstance

from dagster_taskiq.core.health import RECEIVE_WAIT_SECONDS, VISIBILITY_MARGIN_SECONDS
from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.dead_letters.processor import Outcome
from tests import jobs
from tests.conftest import StackFactory, start_workers
from tests.e2e.test_dead_letters import alerts
from tests.helpers import RunProcess, step_events, wait_for

DELIVERIES = 2
LEASE = 5
DEAD_LETTER_TIMEOUT = 5
# Two deliveries (each a claim, a dead step process and a 5 s give-back), the grace after
# the last lease expired, health checks every second, and a run worker's start.
RUN_BOUND = 2 * 20 + VISIBILITY_MARGIN_SECONDS + RECEIVE_WAIT_SECONDS + DEAD_LETTER_TIMEOUT + 60


@pytest.mark.slow  # a long fault run: `make test-slow`
def test_a_run_whose_last_delivery_died_ends_without_the_dlq_processor(
    make_stack: StackFactory, ledger: Ledger
) -> None:
    with make_stack(max_receive_count=DELIVERIES) as stack:
        instance = DagsterInstance.get()
        start_workers(stack, 1)
        # No DLQ processor: the step's message ends in the DLQ and nobody marks the step.
        config = {
            "visibility_timeout": LEASE,
            "max_receive_count": DELIVERIES,
            "dead_letter_timeout": DEAD_LETTER_TIMEOUT,
            "health_check_interval": 1,
        }
        started = time.monotonic()
        run = RunProcess("killer_job", {"execution": {"config": config}})
        try:
            code, err = run.wait(timeout=RUN_BOUND)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"the run did not end on its own within {RUN_BOUND} s") from e
        finally:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait(10)
        took = time.monotonic() - started

        assert code == 1, err[-2000:]
        (failure,) = step_events(instance, run.run_id, DagsterEventType.STEP_FAILURE)
        error = failure.step_failure_data.error
        assert error is not None
        assert "failed health check" in error.message
        assert f"used its last of {DELIVERIES} deliveries" in error.message
        assert "its message is in the dead-letter queue" in error.message
        assert "check the DLQ processor function" in error.message
        starts = [r for r in jobs.execution_rows(run.run_id) if r["phase"] == "start"]
        assert len(starts) == DELIVERIES
        key = f"{run.run_id}:kills_its_worker:0"
        record = ledger.get(key)
        assert record is not None and record.presumed_dead_letter
        # The message did reach the DLQ.
        dlq = SqsQueue(stack.dlq_url, endpoint_url=stack.sqs_endpoint)
        (letter,) = wait_for(
            lambda: dlq.receive(max_messages=1, wait_seconds=1, visibility_timeout=1),
            timeout=30,
            what="the dead letter",
        )
        assert json.loads(letter.body)["idempotency_key"] == key
        assert alerts(stack) == [], "no alert before the DLQ processor runs"

        consumer = stack.process_dead_letters()
        (result,) = wait_for(lambda: consumer.results, timeout=30, what="the confirmation")
        assert result.outcome is Outcome.CONFIRMED and result.alerted
        (alert,) = wait_for(lambda: alerts(stack), timeout=20, what="the SNS alert")
        assert run.run_id in alert and "kills_its_worker" in alert
        assert '"presumed_by_executor": true' in alert
        record = ledger.get(key)
        assert record is not None and record.status is Status.DEAD_LETTERED
        assert not record.presumed_dead_letter

        # SQS delivers the letter again: confirmed once, alerted once.
        dlq.send(letter.body)
        wait_for(lambda: len(consumer.results) == 2, timeout=30, what="the second delivery")
        assert consumer.results[1].outcome is Outcome.ALREADY_TERMINAL
        assert alerts(stack) == []
        print(f"the run ended on its own after {took:.0f} s (bound {RUN_BOUND:.0f} s)")
