"""The step process's cache of execution plans gives every step the plan Dagster would
build for it: retries, outputs passed between steps, dynamic outputs, several runs."""

# No ``from __future__ import annotations``: Dagster reads the op signatures' types.
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import (
    Config,
    DagsterInstance,
    DynamicOut,
    DynamicOutput,
    In,
    RetryPolicy,
    job,
    op,
    reconstructable,
)
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.plan.outputs import StepOutputHandle
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.snap.execution_plan_snapshot import snapshot_from_execution_plan
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.test_utils import instance_for_test

from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.plans import PlanCache


class SizeConfig(Config):
    size: int = 2


@op(out=DynamicOut(int))
def split(config: SizeConfig) -> Iterator[DynamicOutput[int]]:
    for index in range(config.size):
        yield DynamicOutput(index, mapping_key=str(index))


@op(retry_policy=RetryPolicy(max_retries=2))
def square(value: int) -> int:
    return value * value


@op(ins={"values": In(list[int])})
def total(values: list[int]) -> int:
    return sum(values)


@op
def start() -> int:
    return 1


@op
def add_one(value: int) -> int:
    return value + 1


@job
def dynamic_job() -> None:
    total(split().map(square).collect())


@job
def plain_job() -> None:
    add_one(start())


# The jobs above: the allow-list of the plans built here.
LOCATIONS = (CodeLocation(__name__),)


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def _run(instance: DagsterInstance, recon: ReconstructableJob, run_config: Any) -> DagsterRun:
    job_def = recon.get_definition()
    plan = create_execution_plan(recon, run_config=run_config)
    return instance.create_run_for_job(
        job_def=job_def,
        execution_plan=plan,
        run_config=run_config,
        job_code_origin=recon.get_python_origin(),
    )


def _snapshot(plan: ExecutionPlan) -> Any:
    return snapshot_from_execution_plan(plan, "job-snapshot")


def _assert_as_dagster_builds(
    plan: ExecutionPlan,
    recon: ReconstructableJob,
    run: DagsterRun,
    step_key: str,
    known_state: KnownExecutionState,
) -> None:
    expected = create_execution_plan(
        recon,
        run_config=run.run_config,
        step_keys_to_execute=[step_key],
        known_state=known_state,
    )
    assert _snapshot(plan) == _snapshot(expected)
    assert plan.known_state == known_state
    assert plan.step_keys_to_execute == [step_key]
    assert plan.artifacts_persisted == expected.artifacts_persisted
    assert plan.executor_name == expected.executor_name


def test_steps_of_one_run_share_one_build_and_get_their_own_known_state(
    instance: DagsterInstance,
) -> None:
    recon = reconstructable(plain_job)
    run = _run(instance, recon, {})
    plans = PlanCache(LOCATIONS)

    first = KnownExecutionState()
    _, plan = plans.step_plan(instance, run, ["start"], first)
    _assert_as_dagster_builds(plan, recon, run, "start", first)

    # The next step, its input ready; then a retry of it: another known state each time.
    ready = KnownExecutionState(ready_outputs={StepOutputHandle("start", "result")})
    _, plan = plans.step_plan(instance, run, ["add_one"], ready)
    _assert_as_dagster_builds(plan, recon, run, "add_one", ready)
    retried = KnownExecutionState(
        previous_retry_attempts={"add_one": 1},
        ready_outputs={StepOutputHandle("start", "result")},
    )
    _, plan = plans.step_plan(instance, run, ["add_one"], retried)
    _assert_as_dagster_builds(plan, recon, run, "add_one", retried)
    assert plan.known_state.get_retry_state().get_attempt_count("add_one") == 1

    assert (plans.misses, plans.hits) == (1, 2)


def test_a_second_run_of_the_same_job_gets_its_own_plan(instance: DagsterInstance) -> None:
    recon = reconstructable(dynamic_job)
    small = _run(instance, recon, {"ops": {"split": {"config": {"size": 2}}}})
    large = _run(instance, recon, {"ops": {"split": {"config": {"size": 3}}}})
    plans = PlanCache(LOCATIONS)
    for run in (small, large, small):
        _, plan = plans.step_plan(instance, run, ["split"], None)
        _assert_as_dagster_builds(plan, recon, run, "split", KnownExecutionState())
    assert (plans.misses, plans.hits) == (2, 1)


def test_dynamic_steps_resolve_from_the_steps_own_mappings(instance: DagsterInstance) -> None:
    recon = reconstructable(dynamic_job)
    run = _run(instance, recon, {"ops": {"split": {"config": {"size": 2}}}})
    plans = PlanCache(LOCATIONS)

    _, plan = plans.step_plan(instance, run, ["split"], None)
    _assert_as_dagster_builds(plan, recon, run, "split", KnownExecutionState())
    # Whatever executing a step does to its plan (resolving dynamic outputs adds steps to
    # it) stays in that plan: the next step's plan is built as if nothing happened.
    plan.step_dict.clear()
    plan.step_dict_by_key.clear()

    mapped = KnownExecutionState(
        dynamic_mappings={"split": {"result": ["0", "1"]}},
        ready_outputs={StepOutputHandle("split", "result", key) for key in ("0", "1")},
    )
    for key in ("square[0]", "square[1]"):
        _, plan = plans.step_plan(instance, run, [key], mapped)
        _assert_as_dagster_builds(plan, recon, run, key, mapped)
    collected = KnownExecutionState(
        dynamic_mappings={"split": {"result": ["0", "1"]}},
        ready_outputs={
            *(StepOutputHandle("split", "result", key) for key in ("0", "1")),
            *(StepOutputHandle(f"square[{key}]", "result") for key in ("0", "1")),
        },
    )
    _, plan = plans.step_plan(instance, run, ["total"], collected)
    _assert_as_dagster_builds(plan, recon, run, "total", collected)

    # A retry of split knows no mappings: its plan is the unresolved one again.
    retried = KnownExecutionState(previous_retry_attempts={"split": 1})
    _, plan = plans.step_plan(instance, run, ["split"], retried)
    _assert_as_dagster_builds(plan, recon, run, "split", retried)
    assert "square[0]" not in plan.step_dict_by_key


def test_the_cache_is_bounded(instance: DagsterInstance) -> None:
    recon = reconstructable(plain_job)
    plans = PlanCache(LOCATIONS, size=2)
    runs = [_run(instance, recon, {}) for _ in range(3)]
    for run in runs:
        plans.step_plan(instance, run, ["start"], None)
    assert len(plans) == 2
    plans.step_plan(instance, runs[0], ["start"], None)  # dropped first, built again
    assert (plans.misses, plans.hits) == (4, 0)


def test_steps_run_with_the_cached_plans_and_resolve_the_run_config_once(
    instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster import DagsterEventType
    from dagster._core.system_config.objects import ResolvedRunConfig
    from dagster._grpc.types import ExecuteStepArgs

    from dagster_taskiq.worker.execution import step_events

    builds = []
    build = ResolvedRunConfig.build

    def counting_build(*args: Any, **kwargs: Any) -> ResolvedRunConfig:
        builds.append(args)
        return build(*args, **kwargs)

    monkeypatch.setattr(ResolvedRunConfig, "build", staticmethod(counting_build))
    recon = reconstructable(plain_job)
    run = _run(instance, recon, {})
    builds.clear()
    plans = PlanCache(LOCATIONS)
    steps = [
        ("start", KnownExecutionState()),
        ("add_one", KnownExecutionState(ready_outputs={StepOutputHandle("start", "result")})),
    ]
    for step_key, known_state in steps:
        args = ExecuteStepArgs(
            job_origin=recon.get_python_origin(),
            run_id=run.run_id,
            step_keys_to_execute=[step_key],
            known_state=known_state,
        )
        events = list(step_events(args, instance, run, plans))
        assert [e.event_type for e in events if e.step_key == step_key][-1] == (
            DagsterEventType.STEP_SUCCESS
        )
    assert len(builds) == 1, "resolved once for the run, not again per step"
    # add_one loaded start's output
    assert len(instance.all_logs(run.run_id, of_type=DagsterEventType.LOADED_INPUT)) == 1
