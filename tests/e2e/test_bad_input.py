"""Bad input gets a clear error and loses nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from dagster import DagsterInstance, execute_job, reconstructable
from dagster._core.errors import DagsterInvalidConfigError

from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.messages import StepMessage, encode
from dagster_taskiq.core.settings import ENV_CODE_LOCATIONS, ENV_QUEUE_URL
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.local.stack import LocalStack
from tests import jobs
from tests.conftest import REPO_ROOT, StackFactory, start_workers
from tests.helpers import wait_for

KEY = "a-test-signing-key"


def run_text(instance: DagsterInstance, run_id: str) -> str:
    """Every message and error of a run's events, for asserting what a user would read."""
    chunks = []
    for record in instance.get_records_for_run(run_id, limit=10_000).records:
        entry = record.event_log_entry
        chunks.append(entry.message or "")
        event = entry.dagster_event
        if event is None:
            continue
        data: Any = event.event_specific_data
        error = getattr(data, "error", None)
        if error is not None:
            chunks.append(error.to_string())
    return "\n".join(chunks)


def failed_run(instance: DagsterInstance, execution_config: dict[str, Any]) -> tuple[str, str]:
    """Run outputs_job with this executor config; it must fail. Returns (run_id, its text)."""
    result = execute_job(
        reconstructable(jobs.outputs_job),
        instance=instance,
        run_config={"execution": {"config": execution_config}},
        raise_on_error=False,
    )
    assert not result.success
    return result.run_id, run_text(instance, result.run_id)


def a_message(step_args: str = "{}", run_id: str | None = None) -> StepMessage:
    return StepMessage.new(
        run_id=run_id or str(uuid.uuid4()),
        step_key="some_step",
        attempt=0,
        step_args=step_args,
        lease_seconds=30,
    )


def test_malformed_forged_oversized_and_unknown_messages_are_recorded_never_run(
    make_stack: StackFactory, ledger: Ledger
) -> None:
    with make_stack(max_receive_count=2) as stack:
        pool = start_workers(stack, 1, args=("--signing-key", KEY, "--max-message-bytes", "4000"))
        queue = SqsQueue(stack.queue_url, endpoint_url=stack.sqs_endpoint)
        well_formed = a_message()
        bodies = {
            "malformed": "this is not JSON",
            "unknown_version": json.dumps({"schema": 99, "idempotency_key": "x"}),
            "forged": encode(well_formed, signing_key="not-the-key", max_bytes=4000),
            "unsigned": encode(well_formed, signing_key=None, max_bytes=4000),
            "oversized": encode(a_message("x" * 5000), signing_key=KEY, max_bytes=10**6),
            "unknown_key": encode(
                a_message('{"__class__": "ExecuteStepArgs"}'), signing_key=KEY, max_bytes=4000
            ),
        }
        sent = {queue.send(body): name for name, body in bodies.items()}

        def recorded() -> dict[str, str]:
            rows = [r for r in ledger.rejections() if r["message_id"] in sent]
            return {sent[r["message_id"]]: r["reason"] for r in rows}

        reasons = wait_for(lambda: len(recorded()) == len(sent) and recorded(), timeout=60)
        assert reasons == {
            "malformed": "malformed",
            "unknown_version": "unknown_version",
            "forged": "forged",
            "unsigned": "forged",
            "oversized": "oversized",
            # Authentic, but its arguments are not Dagster step arguments.
            "unknown_key": "malformed",
        }
        # Nothing executed, nothing lost: every message ends in the dead-letter queue.
        dlq = SqsQueue(stack.dlq_url, endpoint_url=stack.sqs_endpoint)
        wait_for(
            lambda: dlq.depth().visible == len(sent),
            timeout=90,
            what="all rejected messages to reach the DLQ",
        )
        assert ledger.get(well_formed.idempotency_key) is None
        assert all(p.poll() is None for p in pool.processes), "a worker crashed"


def test_an_oversized_step_fails_at_launch_with_a_clear_error(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    run_id, text = failed_run(instance, {"max_message_bytes": 300})
    assert "more than the limit of 300 bytes" in text
    assert ledger.for_run(run_id) == [], "nothing was recorded or sent"


@pytest.mark.parametrize(
    ("execution_config", "expected"),
    [
        (
            {
                "database_url": "postgresql://postgres:hunter2@127.0.0.1:1/nowhere",
                "unreachable_retry_seconds": 2,
            },
            "The ledger database postgresql+pg8000://postgres:***@127.0.0.1:1/nowhere "
            "is unreachable",
        ),
        (
            {"endpoint_url": "http://127.0.0.1:1", "unreachable_retry_seconds": 2},
            "cannot reach its queue",
        ),
    ],
)
def test_a_config_mistake_fails_the_run_at_start_saying_what_to_fix(
    stack: LocalStack,
    instance: DagsterInstance,
    execution_config: dict[str, Any],
    expected: str,
) -> None:
    _, text = failed_run(instance, execution_config)
    assert expected in text
    assert "hunter2" not in text


def test_an_unset_env_var_in_the_config_is_named(
    stack: LocalStack, instance: DagsterInstance
) -> None:
    # Dagster validates {env: VAR} before the run starts, naming the variable.
    with pytest.raises(DagsterInvalidConfigError, match="NO_SUCH_VARIABLE_FOR_TASKIQ"):
        execute_job(
            reconstructable(jobs.outputs_job),
            instance=instance,
            run_config={
                "execution": {"config": {"queue_url": {"env": "NO_SUCH_VARIABLE_FOR_TASKIQ"}}}
            },
        )


def test_a_missing_queue_url_fails_the_run_at_start(
    stack: LocalStack, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_QUEUE_URL)
    _, text = failed_run(instance, {})
    assert "set `queue_url` in the executor config" in text
    assert ENV_QUEUE_URL in text


def test_a_job_outside_the_workers_code_locations_is_refused(
    stack: LocalStack, instance: DagsterInstance, ledger: Ledger
) -> None:
    start_workers(stack, 1, extra_env={ENV_CODE_LOCATIONS: "some.other.module"})
    run_id, text = failed_run(instance, {"health_check_interval": 1})
    assert "not one of this worker's code locations (some.other.module)" in text
    assert jobs.execution_rows(run_id) == [], "nothing from the job was imported or run"


@pytest.mark.parametrize(
    ("args", "log_line"),
    [
        (("--database-url", "postgresql://postgres@127.0.0.1:1/nowhere"), "Ledger unreachable"),
        (("--endpoint-url", "http://127.0.0.1:1"), "SQS unreachable"),
    ],
)
def test_worker_backs_off_through_an_outage_and_loses_nothing(
    stack: LocalStack, args: tuple[str, ...], log_line: str
) -> None:
    queue = SqsQueue(stack.queue_url, endpoint_url=stack.sqs_endpoint)
    queue.send(encode(a_message(), signing_key=None, max_bytes=10**5))
    pool = start_workers(stack, 1, args=args)
    (worker,) = pool.processes
    wait_for(lambda: log_line in pool.logs(), timeout=60, what=log_line)
    time.sleep(2)
    assert worker.poll() is None, "the worker exited during the outage"
    assert "Traceback" not in pool.logs()
    depth = queue.depth()
    assert depth.visible + depth.in_flight == 1, "the message is still queued"
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_worker_without_a_code_location_says_what_to_set(stack: LocalStack) -> None:
    env = {**stack.env(), ENV_CODE_LOCATIONS: ""}
    completed = subprocess.run(
        [sys.executable, "-m", "dagster_taskiq", "worker"],
        env={**env, "PATH": "/usr/bin:/bin"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert "--code-location" in completed.stderr
