"""Queue routing, priority lanes and FIFO queues, through real runs and real workers."""

from __future__ import annotations

from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable

from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.core.settings import ENV_PRIORITY_QUEUE_URL
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.load import executions
from dagster_taskiq.local.stack import LocalStack
from tests import jobs
from tests.conftest import StackFactory, start_workers
from tests.helpers import RunProcess, finished_records, step_events, wait_for


def _queues(**urls: str) -> dict[str, Any]:
    return {"execution": {"config": {"queues": {name: {"url": url} for name, url in urls.items()}}}}


def test_steps_go_to_the_queue_their_tag_names_and_its_pool_runs_them(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    highmem_url, _ = stack.add_queue("highmem")
    default_pool = start_workers(stack, 1, name="default")
    highmem_pool = start_workers(stack, 1, name="highmem", args=("--queue-url", highmem_url))

    with execute_job(
        reconstructable(jobs.routed_job), instance=instance, run_config=_queues(highmem=highmem_url)
    ) as result:
        assert result.success
    records = {r.step_key: r for r in finished_records(ledger, result.run_id)}
    assert records["on_default"].queue_url == stack.queue_url
    assert records["on_highmem"].queue_url == highmem_url
    ran_on = {r["step_key"]: r["worker_pid"] for r in jobs.execution_rows(result.run_id)}
    assert ran_on["on_default"] in {p.pid for p in default_pool.processes}
    assert ran_on["on_highmem"] in {p.pid for p in highmem_pool.processes}
    queued = step_events(instance, result.run_id, DagsterEventType.STEP_WORKER_STARTING)
    assert any('on queue "highmem"' in (e.message or "") for e in queued)


def test_an_unknown_queue_name_fails_the_step_at_launch_naming_the_known_queues(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    highmem_url, _ = stack.add_queue("highmem")
    start_workers(stack, 1)
    result = execute_job(
        reconstructable(jobs.misrouted_job),
        instance=instance,
        run_config=_queues(highmem=highmem_url),
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = step_events(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    assert failure.step_key == "misrouted"
    error = failure.step_failure_data.error
    assert error is not None
    assert "'nowhere'" in error.message and "Known queues: default, highmem" in error.message
    # The rest of the run still ran; the misrouted op's body never did.
    assert [r["step_key"] for r in jobs.execution_rows(result.run_id)] == ["on_default"]
    records = {r.step_key: r for r in finished_records(ledger, result.run_id)}
    assert records["misrouted"].status is Status.FAILED
    assert "Known queues" in (records["misrouted"].error or "")


def test_a_priority_that_is_not_a_number_fails_the_step_with_the_reason(
    stack: LocalStack, instance: DagsterInstance
) -> None:
    result = execute_job(
        reconstructable(jobs.bad_priority_job), instance=instance, raise_on_error=False
    )
    assert not result.success
    (failure,) = step_events(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    error = failure.step_failure_data.error
    assert error is not None and "'soon', which is not a whole number" in error.message


def test_priority_work_is_taken_first_under_a_backlog_and_normal_work_is_not_starved(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    lane_url, _ = stack.add_queue("priority")
    monkeypatch.setenv(ENV_PRIORITY_QUEUE_URL, lane_url)  # the executor's priority_queue_url
    # A backlog first: both runs queue all their steps while no worker runs.
    background = RunProcess("background_job")
    urgent = RunProcess("urgent_job")  # run priority 5: its steps go to the lane
    run_ids = [background.run_id, urgent.run_id]
    wait_for(
        lambda: len(ledger.for_runs(run_ids)) == 12,
        timeout=90,
        what="both runs to queue their 12 steps",
    )
    lanes = {r.step_key.split("_")[0]: r.queue_url for r in ledger.for_runs(run_ids)}
    assert lanes == {"background": stack.queue_url, "urgent": lane_url}

    # One step at a time, so the order of execution is the order of receiving.
    start_workers(stack, 1, args=("--priority-queue-url", lane_url, "--priority-ratio", "3"))
    for run in (background, urgent):
        code, err = run.wait(timeout=180)
        assert code == 0, err

    engine = executions._engine()
    order = ["U" if r["run_id"] == urgent.run_id else "B"
             for r in executions.rows_for_runs(engine, run_ids)]  # fmt: skip
    assert len(order) == 12
    # Three receives from the lane, then one that serves the normal queue first.
    assert order[:4] == ["U", "U", "U", "B"], order
    assert "U" not in order[8:], order


@pytest.mark.parametrize("group", ["run", "step"])
def test_fifo_queue_end_to_end(make_stack: StackFactory, ledger: Ledger, group: str) -> None:
    with make_stack(queue_name=f"steps-{group}.fifo") as stack:
        instance = DagsterInstance.get()
        queue = SqsQueue(stack.queue_url, endpoint_url=stack.sqs_endpoint)
        assert queue.is_fifo and queue.attributes()["FifoQueue"] == "true"
        start_workers(stack, 1, concurrency=2)
        config = {"execution": {"config": {"fifo_message_group": group}}}
        with execute_job(
            reconstructable(jobs.fanout_job), instance=instance, run_config=config
        ) as result:
            assert result.success
        records = finished_records(ledger, result.run_id)
        assert len(records) == 5
        assert all(r.status is Status.SUCCEEDED and r.deliveries == 1 for r in records)
        assert len(jobs.execution_rows(result.run_id)) == 5
        instance.dispose()


def test_fifo_queue_drops_a_resent_step_by_its_idempotency_key(make_stack: StackFactory) -> None:
    with make_stack(queue_name="dedup.fifo") as stack:
        queue = SqsQueue(stack.queue_url, endpoint_url=stack.sqs_endpoint)
        key = "run-1:step:0"
        queue.send('{"a": 1}', group_id="run-1", dedup_id=key)
        queue.send('{"a": 1}', group_id="run-1", dedup_id=key)  # accepted, not delivered
        queue.send('{"a": 2}', group_id="run-1", dedup_id="run-1:step:1")
        assert queue.depth().visible == 2
