"""Jobs through the real executor, SQS emulator, ledger and worker processes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import pytest
from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable
from dagster._core.definitions.reconstruct import ReconstructableRepository

from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.load.faults import DuplicatingRelay
from dagster_taskiq.local.stack import LocalStack
from tests import jobs
from tests.conftest import REPO_ROOT, start_workers
from tests.helpers import finished_records, step_events


def test_outputs_pass_between_steps_on_two_workers(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    pool = start_workers(stack, 2)
    with execute_job(reconstructable(jobs.outputs_job), instance=instance) as result:
        assert result.success
        assert result.output_for_node("combine") == 63
    successes = step_events(instance, result.run_id, DagsterEventType.STEP_SUCCESS)
    assert {e.step_key for e in successes} == {"emit", "double", "combine"}
    rows = jobs.execution_rows(result.run_id)
    assert sorted(r["step_key"] for r in rows) == ["combine", "double", "emit"]
    worker_pids = {p.pid for p in pool.processes}
    assert {r["worker_pid"] for r in rows} <= worker_pids
    assert all(r["fencing_token"] == 1 for r in rows)
    records = finished_records(ledger, result.run_id)
    assert [r.status for r in records] == [Status.SUCCEEDED] * 3
    assert all(r.deliveries == 1 and r.duplicates_suppressed == 0 for r in records)


def test_retry_policy_gets_its_own_key_and_succeeds(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    start_workers(stack, 2)
    with execute_job(reconstructable(jobs.retry_job), instance=instance) as result:
        assert result.success
        assert result.output_for_node("fails_once") == "second attempt"
    records = {r.idempotency_key: r for r in finished_records(ledger, result.run_id)}
    run_id = result.run_id
    assert set(records) == {f"{run_id}:fails_once:0", f"{run_id}:fails_once:1"}
    assert records[f"{run_id}:fails_once:0"].status is Status.FAILED
    assert records[f"{run_id}:fails_once:1"].status is Status.SUCCEEDED
    assert [r["retry_number"] for r in jobs.execution_rows(run_id)] == [0, 1]
    assert step_events(instance, run_id, DagsterEventType.STEP_UP_FOR_RETRY)


def test_failing_op_is_a_step_failure_with_the_ops_error(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    start_workers(stack, 1)
    result = execute_job(reconstructable(jobs.failing_job), instance=instance, raise_on_error=False)

    assert not result.success
    failures = step_events(instance, result.run_id, DagsterEventType.STEP_FAILURE)
    assert len(failures) == 1
    error = failures[0].step_failure_data.error
    assert error is not None
    assert "the op failed with code 42" in error.to_string()
    (record,) = finished_records(ledger, result.run_id)
    assert record.status is Status.FAILED
    assert record.error is not None and "the op failed with code 42" in record.error


def test_a_steps_output_is_captured_and_mirrored_to_the_workers_log(
    stack: LocalStack, instance: DagsterInstance
) -> None:
    pool = start_workers(stack, 1)
    with execute_job(reconstructable(jobs.printing_job), instance=instance) as result:
        assert result.success
    run_id = result.run_id
    (captured,) = step_events(instance, run_id, DagsterEventType.LOGS_CAPTURED)
    assert captured.logs_captured_data.step_keys == ["prints"]
    manager = instance.compute_log_manager
    log_key = manager.build_log_key_for_run(run_id, captured.logs_captured_data.file_key)
    data = manager.get_log_data(log_key)
    assert data.stdout is not None and data.stderr is not None
    # Dagster's own log lines are captured with the op's.
    stdout, stderr = data.stdout.decode().splitlines(), data.stderr.decode().splitlines()
    assert f"printed by {run_id}" in stdout and f"written by {run_id}" in stdout
    assert f"warned by {run_id}" in stderr and f"printed by {run_id}" not in stderr
    # The worker's own output (a container's log) has it too, every line.
    (worker,) = pool.workers
    worker_log = (stack.root / "logs" / f"{worker.name}.log").read_text()
    for line in (f"printed by {run_id}", f"warned by {run_id}", f"written by {run_id}"):
        assert line in worker_log


def test_step_processes_stay_warm_and_recycle_after_max_steps(
    make_stack: Any, ledger: Ledger
) -> None:
    with make_stack() as stack:
        instance = DagsterInstance.get()
        start_workers(stack, 1)
        warm = execute_job(reconstructable(jobs.outputs_job), instance=instance)
        assert warm.success
        warm_pids = {r["process_pid"] for r in jobs.execution_rows(warm.run_id)}
        assert len(warm_pids) == 1, "one warm step process ran all three steps"

    with make_stack() as stack:
        instance = DagsterInstance.get()
        start_workers(stack, 1, args=("--max-steps-per-process", "1"))
        recycled = execute_job(reconstructable(jobs.outputs_job), instance=instance)
        assert recycled.success
        recycled_pids = {r["process_pid"] for r in jobs.execution_rows(recycled.run_id)}
        assert len(recycled_pids) == 3, "a new step process after every step"


class _ProtectionAgent(BaseHTTPRequestHandler):
    calls: ClassVar[list[dict[str, Any]]] = []

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        type(self).calls.append({"path": self.path, **body})
        reply = json.dumps({"protection": {"ProtectionEnabled": body["ProtectionEnabled"]}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def protection_agent() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Stands in for the ECS agent's task-protection endpoint (moto has none)."""
    _ProtectionAgent.calls = []
    server = HTTPServer(("127.0.0.1", 0), _ProtectionAgent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _ProtectionAgent.calls
    server.shutdown()


def test_scale_in_protection_on_while_a_step_runs(
    stack: LocalStack,
    instance: DagsterInstance,
    protection_agent: tuple[str, list[dict[str, Any]]],
) -> None:
    agent_uri, calls = protection_agent
    start_workers(stack, 1, extra_env={"ECS_AGENT_URI": agent_uri})
    result = execute_job(
        reconstructable(jobs.slow_job),
        instance=instance,
        run_config={"ops": {"slow": {"config": {"seconds": 1.0}}}},
    )

    assert result.success
    assert calls, "the worker never called the task-protection endpoint"
    assert all(c["path"] == "/task-protection/v1/state" for c in calls)
    assert calls[0]["ProtectionEnabled"] is True and calls[0]["ExpiresInMinutes"] > 0
    # The worker records the step's ending, then turns protection off, a moment after the
    # run worker has read the step's success (the run may end first).
    deadline = time.monotonic() + 10
    while calls[-1]["ProtectionEnabled"] is not False and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls[-1]["ProtectionEnabled"] is False


def test_executor_set_on_definitions(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    start_workers(stack, 1)
    recon_job = ReconstructableRepository.for_module(
        "tests.jobs", "defs", working_directory=str(REPO_ROOT)
    ).get_reconstructable_job("plain_job")
    result = execute_job(recon_job, instance=instance)

    assert result.success
    (row,) = jobs.execution_rows(result.run_id)
    assert row["fencing_token"] == 1, "the op ran on a taskiq worker"
    assert [r.status for r in finished_records(ledger, result.run_id)] == [Status.SUCCEEDED]


def test_messages_carry_no_instance_ref_and_no_credentials(
    stack: LocalStack, instance: DagsterInstance
) -> None:
    with DuplicatingRelay(stack, copies=1) as tee:
        start_workers(stack, 1, args=("--queue-url", tee.workers_queue_url))
        result = execute_job(reconstructable(jobs.outputs_job), instance=instance)
    assert result.success
    assert len(tee.bodies) == 3
    for body in tee.bodies:
        args = json.loads(body)["step_args"]["data"]
        assert '"instance_ref": null' in args
        assert "InstanceRef" not in args
        assert "postgres" not in body.lower() and "pgdata" not in body
