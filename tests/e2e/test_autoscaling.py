"""The local stack sized by the scaling policy: from zero, on the executor's trigger."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from dagster import DagsterInstance, execute_job, reconstructable

from dagster_taskiq.local.stack import LocalStack, create_database, local_stack
from dagster_taskiq.scaling.policy import Reason, ScalingConfig
from tests import jobs
from tests.helpers import wait_for


def test_an_idle_stack_scales_from_zero_on_the_executors_trigger_and_back(
    stack: LocalStack, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = stack.worker_pool(extra_args=("--wait-seconds", "1"))
    config = ScalingConfig(max_workers=2, scale_in_stabilization_seconds=3)
    # A tick far longer than the test: only the executor's trigger can start a worker.
    autoscaler = stack.autoscale(pool, config, tick_seconds=600)
    for key, value in stack.env().items():  # now with the scaler function for the executor
        monkeypatch.setenv(key, value)
    assert pool.target == 0

    result = execute_job(reconstructable(jobs.outputs_job), instance=instance)

    assert result.success
    first = autoscaler.evaluations[0]
    _, evaluation, cause = first
    assert cause == "invoked by the executor"
    assert evaluation.decision.reason is Reason.SCALE_FROM_ZERO
    assert evaluation.applied and evaluation.decision.desired >= 1
    assert stack.lambda_endpoint.invocations, "the executor called Lambda's Invoke API"

    # The next evaluations see an empty queue; after the window the pool goes to zero.
    autoscaler.tick_seconds = 0.5
    autoscaler.invoke({})
    scale_in = autoscaler.wait_for_evaluation(
        lambda e: e.decision.reason is Reason.SCALE_IN, timeout=30
    )
    assert scale_in is not None, "no scale-in evaluation within 30 s"
    assert scale_in.applied and scale_in.decision.desired == 0
    assert pool.target == 0
    wait_for(lambda: pool.size == 0, timeout=60, what="the workers to drain and exit")


def test_the_local_scaler_works_on_a_database_no_run_has_used_yet(
    postgres_url: str, sqs_endpoint: str, tmp_path: Path
) -> None:
    fresh = create_database(postgres_url, f"fresh_{uuid.uuid4().hex[:8]}")
    with local_stack(tmp_path, database_url=fresh, sqs_endpoint=sqs_endpoint) as stack:
        pool = stack.worker_pool()
        autoscaler = stack.autoscale(pool, ScalingConfig(max_workers=1), tick_seconds=0.2)
        wait_for(lambda: autoscaler.evaluations, timeout=20, what="a first evaluation")
        _, evaluation, _ = autoscaler.evaluations[0]
        assert evaluation.decision.reason is Reason.HOLD
        assert pool.target == 0
