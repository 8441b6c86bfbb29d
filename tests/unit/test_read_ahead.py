"""The step process reads a message's run and builds its step's plan while the supervisor
claims the message; the step then runs on them, unless they are another message's, or
too old to decide by."""

# No ``from __future__ import annotations``: Dagster reads the op signatures' types.
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, job, op, reconstructable
from dagster._core.execution.api import create_execution_plan
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.test_utils import instance_for_test
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import serialize_value

from dagster_taskiq.core.messages import StepMessage
from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.execution import (
    READ_AHEAD_FRESH_SECONDS,
    ReadAhead,
    execute,
    read_ahead,
)
from dagster_taskiq.worker.plans import PlanCache
from dagster_taskiq.worker.tasks import Outcome, StepTask


@op
def only() -> int:
    return 1


@job
def one_op_job() -> None:
    only()


# one_op_job's module: the allow-list of the plans built here.
LOCATIONS = (CodeLocation(__name__),)


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def _run(instance: DagsterInstance) -> tuple[DagsterRun, str]:
    recon = reconstructable(one_op_job)
    run = instance.create_run_for_job(
        job_def=recon.get_definition(),
        execution_plan=create_execution_plan(recon),
        job_code_origin=recon.get_python_origin(),
    )
    args = ExecuteStepArgs(
        job_origin=recon.get_python_origin(), run_id=run.run_id, step_keys_to_execute=["only"]
    )
    return run, serialize_value(args)


def _task(run: DagsterRun, step_args: str) -> StepTask:
    message = StepMessage.new(run.run_id, "only", 0, step_args, lease_seconds=60)
    return StepTask(
        message=message, fencing_token=1, worker_id="w", delivery=1, previous_worker=None
    )


def _counting_run_reads(instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    get_run_by_id = instance.get_run_by_id

    def counting(run_id: str) -> Any:
        reads.append(run_id)
        return get_run_by_id(run_id)

    monkeypatch.setattr(instance, "get_run_by_id", counting)
    return reads


def test_the_step_runs_on_what_was_read_ahead(
    instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, step_args = _run(instance)
    plans = PlanCache(LOCATIONS)
    injected: list[str | None] = []
    monkeypatch.setattr(instance, "inject_env_vars", injected.append)
    ahead = read_ahead(instance, step_args, plans)
    assert ahead is not None and ahead.run is not None and ahead.plan is not None
    assert ahead.run.run_id == run.run_id
    assert ahead.plan[1].step_keys_to_execute == ["only"]
    assert plans.misses == 1

    reads = _counting_run_reads(instance, monkeypatch)
    result = execute(instance, _task(run, step_args), plans, ahead)
    assert result.outcome is Outcome.SUCCEEDED
    assert reads == [], "the run read ahead was used, not read again"
    assert (plans.misses, plans.hits) == (1, 0), "nor was the plan looked up again"
    assert len(injected) == 1, "nor the code location's environment prepared again"
    assert instance.get_run_stats(run.run_id).steps_succeeded == 1


def test_another_message_or_an_old_reading_is_not_gone_by(
    instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, step_args = _run(instance)
    ahead = read_ahead(instance, step_args, PlanCache(LOCATIONS))
    assert ahead is not None and ahead.run is not None
    assert ahead.run_for(step_args, run.run_id) is ahead.run
    assert ahead.run_for(step_args + " ", run.run_id) is None
    assert ahead.run_for(step_args, "another-run") is None
    old = ReadAhead(
        step_args, ahead.run, ahead.plan, time.monotonic() - READ_AHEAD_FRESH_SECONDS - 1
    )
    assert old.run_for(step_args, run.run_id) is None

    # The run was cancelled after an old reading: the step reads it again and does not start.
    instance.report_run_canceling(run)
    reads = _counting_run_reads(instance, monkeypatch)
    result = execute(instance, _task(run, step_args), PlanCache(LOCATIONS), old)
    assert result.outcome is Outcome.NOT_STARTED
    assert reads == [run.run_id]
    assert not instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)


def test_reading_ahead_writes_nothing_and_leaves_failures_to_the_step(
    instance: DagsterInstance,
) -> None:
    run, step_args = _run(instance)
    assert read_ahead(instance, "not step arguments", PlanCache(LOCATIONS)) is None
    ahead = read_ahead(instance, step_args, PlanCache(LOCATIONS))
    assert ahead is not None
    assert instance.all_logs(run.run_id) == [], "nothing is written before the claim"

    missing = read_ahead(instance, step_args.replace(run.run_id, "0" * 36), PlanCache(LOCATIONS))
    assert missing is not None and missing.run is None and missing.plan is None

    instance.report_run_canceled(run)
    finished = read_ahead(instance, step_args, PlanCache(LOCATIONS))
    assert finished is not None and finished.plan is None
    assert finished.run is not None and finished.run.status is DagsterRunStatus.CANCELED
