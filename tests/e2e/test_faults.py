"""Faults on real worker processes: duplicates, crashes, shutdowns, cancellation."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    execute_job,
    reconstructable,
)
from dagster._core.execution.api import execute_run
from dagster._core.execution.job_execution_result import JobExecutionResult

from dagster_taskiq.core.ledger import Ledger, Status, StepRecord
from dagster_taskiq.load.faults import DuplicatingRelay, kill_whole_worker
from dagster_taskiq.local.stack import LocalStack
from tests import jobs
from tests.conftest import start_workers
from tests.helpers import RunProcess, engine_messages, finished_records, wait_for

LEASE = 4  # seconds: a dead worker's step is taken over after about this long


def slow_config(seconds: float, *, op: str = "slow", lease: int = LEASE) -> dict[str, Any]:
    return {
        "ops": {op: {"config": {"seconds": seconds}}},
        "execution": {"config": {"visibility_timeout": lease}},
    }


class BackgroundRun:
    """A run executing on a thread of the test, its id known before it starts."""

    def __init__(self, instance: DagsterInstance, job: Any, run_config: dict[str, Any]) -> None:
        origin = reconstructable(job).get_python_origin()
        self.run_id = instance.create_run_for_job(
            job, run_config=run_config, job_code_origin=origin
        ).run_id
        self.results: list[JobExecutionResult] = []
        dagster_run = instance.get_run_by_id(self.run_id)
        assert dagster_run is not None
        self._thread = threading.Thread(
            target=lambda: self.results.append(
                execute_run(reconstructable(job), dagster_run, instance)
            ),
            daemon=True,
        )

    def started(self, step_key: str = "slow") -> list[dict[str, Any]]:
        return [
            r
            for r in jobs.execution_rows(self.run_id)
            if r["step_key"] == step_key and r["phase"] == "start"
        ]


@contextmanager
def run_in_thread(
    instance: DagsterInstance, job: Any, run_config: dict[str, Any]
) -> Iterator[BackgroundRun]:
    run = BackgroundRun(instance, job, run_config)
    run._thread.start()
    yield run
    run._thread.join(120)
    assert run.results, "the run did not finish"


def test_duplicate_delivery_runs_the_op_body_once(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    # The executor sends to one queue; a tee delivers every message twice to the queue
    # the workers read, as SQS's at-least-once delivery may.
    with DuplicatingRelay(stack, copies=2) as tee:
        start_workers(stack, 2, args=("--queue-url", tee.workers_queue_url))
        result = execute_job(
            reconstructable(jobs.slow_job), instance=instance, run_config=slow_config(2.0)
        )
        assert result.success
        key = f"{result.run_id}:slow:0"

        def suppressed() -> StepRecord | None:
            record = ledger.get(key)
            return record if record and record.duplicates_suppressed >= 1 else None

        record = wait_for(suppressed, timeout=30, what="the second copy to be suppressed")

    assert tee.bodies, "the tee delivered nothing"
    assert record.status is Status.SUCCEEDED
    rows = jobs.execution_rows(result.run_id)
    assert [r["phase"] for r in rows] == ["start", "end"], "the op body ran more than once"


@pytest.mark.slow  # a long fault run: `make test-slow`
def test_worker_killed_mid_step_is_taken_over_and_the_run_succeeds(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    pool = start_workers(stack, 2)
    with run_in_thread(instance, jobs.slow_job, slow_config(5.0)) as run:
        first = wait_for(run.started, what="the step to start")
        victim = first[0]["worker_pid"]
        assert victim in {p.pid for p in pool.processes}
        # The whole worker at once, as a lost Fargate task dies.
        kill_whole_worker(victim)

    (result,) = run.results
    assert result.success, "the run must finish without anyone touching it"
    rows = jobs.execution_rows(result.run_id)
    starts = [r for r in rows if r["phase"] == "start"]
    ends = [r for r in rows if r["phase"] == "end"]
    assert [r["fencing_token"] for r in starts] == [1, 2]
    assert [r["fencing_token"] for r in ends] == [2]
    assert starts[1]["worker_pid"] != victim
    (record,) = finished_records(ledger, result.run_id)
    assert record.status is Status.SUCCEEDED and record.fencing_token == 2
    assert record.deliveries >= 2
    assert any("lost its lease" in m for m in engine_messages(instance, result.run_id))


def test_sigterm_lets_a_running_step_finish(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    pool = start_workers(stack, 1, stop_timeout=30)
    (worker,) = pool.processes
    with run_in_thread(instance, jobs.slow_job, slow_config(3.0)) as run:
        wait_for(run.started, what="the step to start")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0

    (result,) = run.results
    assert result.success
    assert [r["phase"] for r in jobs.execution_rows(result.run_id)] == ["start", "end"]
    (record,) = finished_records(ledger, result.run_id)
    assert record.status is Status.SUCCEEDED


def test_sigterm_past_the_stop_timeout_gives_the_step_back(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    pool = start_workers(stack, 1, stop_timeout=1)
    (worker,) = pool.processes
    with run_in_thread(instance, jobs.slow_job, slow_config(4.0, lease=60)) as run:
        wait_for(run.started, what="the step to start")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        released = ledger.get(f"{run.run_id}:slow:0")
        assert released is not None and released.status is Status.RUNNING
        assert not released.lease_live, "the lease is given up at once, not left to expire"
        # The lease is 60 s: only the release lets a new worker start it right away.
        pool.scale_to(1)

    (result,) = run.results
    assert result.success
    phases = [r["phase"] for r in jobs.execution_rows(result.run_id)]
    assert phases == ["start", "start", "end"]
    (record,) = finished_records(ledger, result.run_id)
    assert record.status is Status.SUCCEEDED
    assert record.fencing_token == 2


def test_terminating_a_run_cancels_queued_and_running_steps(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    # One step process: one step runs, three wait in the queue.
    start_workers(stack, 1)
    config = {
        "ops": {f"slow_{i}": {"config": {"seconds": 60.0}} for i in range(4)},
        "execution": {"config": {"visibility_timeout": 9}},
    }
    run = RunProcess("slow_fanout_job", config)
    wait_for(lambda: jobs.execution_rows(run.run_id), what="a step to start")
    run.interrupt()
    run.wait(60)

    def all_cancelled() -> list[StepRecord]:
        records = ledger.for_run(run.run_id)
        return records if all(r.status is Status.CANCELLED for r in records) else []

    records = wait_for(all_cancelled, timeout=30, what="every step to be cancelled")
    assert len(records) == 4
    rows = jobs.execution_rows(run.run_id)
    assert [r["phase"] for r in rows] == ["start"], "queued steps never start, none finishes"
    dagster_run = instance.get_run_by_id(run.run_id)
    assert dagster_run is not None
    assert dagster_run.status is not DagsterRunStatus.SUCCESS


def test_heartbeats_keep_a_step_that_outlives_its_lease(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    start_workers(stack, 2)
    result = execute_job(
        reconstructable(jobs.slow_job), instance=instance, run_config=slow_config(5.0, lease=2)
    )
    assert result.success
    rows = jobs.execution_rows(result.run_id)
    assert [(r["phase"], r["fencing_token"]) for r in rows] == [("start", 1), ("end", 1)]
    record = ledger.get(f"{result.run_id}:slow:0")
    assert record is not None and record.fencing_token == 1 and record.deliveries == 1
