"""What a step process loads is what the allow-list judged.

A job is loaded from its run's code origin (in the instance), not from the origin the
message's step arguments name. A message naming an allowed module for a run of other
code must neither read that run's code ahead nor execute it, nor prepare its
environment: it is refused, with the reason, before anything is imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dagster import DagsterInstance, reconstructable
from dagster._core.execution.api import create_execution_plan
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.test_utils import instance_for_test
from dagster._utils.hosted_user_process import recon_job_from_origin

from dagster_taskiq.core.messages import StepMessage
from dagster_taskiq.worker import plans as plans_module
from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.execution import (
    execute,
    load_step_args,
    read_ahead,
    step_events,
    vet,
)
from dagster_taskiq.worker.plans import OriginRefused, PlanCache
from dagster_taskiq.worker.tasks import Outcome, StepTask, VetRequest, Vetting
from tests import hostile_marker
from tests.hostile import ALLOWED_MODULE, MARKER_MODULE, module_origin, step_args

ALLOWED = (CodeLocation(ALLOWED_MODULE),)


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch, instance: DagsterInstance) -> dict[str, list[Any]]:
    """Every job load and every environment preparation, counted."""
    seen: dict[str, list[Any]] = {"jobs": [], "environments": []}

    def load(origin: Any) -> Any:
        seen["jobs"].append(origin)
        return recon_job_from_origin(origin)

    monkeypatch.setattr(plans_module, "recon_job_from_origin", load)
    monkeypatch.setattr(instance, "inject_env_vars", seen["environments"].append)
    return seen


def _marker_run(instance: DagsterInstance) -> DagsterRun:
    recon = reconstructable(hostile_marker.marker_job)
    return instance.create_run_for_job(
        job_def=recon.get_definition(),
        execution_plan=create_execution_plan(recon),
        job_code_origin=recon.get_python_origin(),
    )


def _task(run_id: str, args: str) -> StepTask:
    message = StepMessage.new(run_id, "touch", 0, args, lease_seconds=60)
    return StepTask(
        message=message, fencing_token=1, worker_id="w", delivery=1, previous_worker=None
    )


def test_an_allowed_origin_in_the_message_does_not_load_another_runs_code(
    instance: DagsterInstance, loads: dict[str, list[Any]]
) -> None:
    run = _marker_run(instance)
    # The arguments name the allowed module, for a run of the marker's code.
    args = step_args(run.run_id, ["touch"], module_origin(ALLOWED_MODULE))
    assert vet(VetRequest(args, run.run_id, "touch"), ALLOWED) == Vetting()
    plans = PlanCache(ALLOWED)

    ahead = read_ahead(instance, args, plans)
    assert ahead is not None and ahead.plan is None
    result = execute(instance, _task(run.run_id, args), plans, ahead)

    assert result.outcome is Outcome.FAILED and not result.succeeded
    assert result.detail is not None and f"'{MARKER_MODULE}'" in result.detail
    assert "--code-location" in result.detail
    assert loads == {"jobs": [], "environments": []}, "nothing loaded, nothing prepared"
    assert instance.all_logs(run.run_id) == [], "nothing written for the run"


def test_step_arguments_must_name_the_runs_own_origin(
    instance: DagsterInstance, loads: dict[str, list[Any]]
) -> None:
    run = _marker_run(instance)
    both = (CodeLocation(ALLOWED_MODULE), CodeLocation(MARKER_MODULE))
    other = step_args(run.run_id, ["touch"], module_origin(ALLOWED_MODULE))
    plans = PlanCache(both)

    ahead = read_ahead(instance, other, plans)
    assert ahead is not None and ahead.plan is None
    result = execute(instance, _task(run.run_id, other), plans, ahead)
    assert result.outcome is Outcome.FAILED
    assert result.detail is not None and "another run or code origin" in result.detail
    with pytest.raises(OriginRefused):
        list(step_events(load_step_args(other), instance, run, plans))
    assert loads == {"jobs": [], "environments": []}

    # The control: the run's own origin, allowed, is read ahead as before.
    assert run.job_code_origin is not None
    own = step_args(run.run_id, ["touch"], run.job_code_origin)
    ahead = read_ahead(instance, own, plans)
    assert ahead is not None and ahead.plan is not None
    assert loads["jobs"] == [run.job_code_origin] and len(loads["environments"]) == 1


def test_the_plan_cache_never_loads_code_outside_its_locations(
    instance: DagsterInstance, loads: dict[str, list[Any]]
) -> None:
    run = _marker_run(instance)
    plans = PlanCache(ALLOWED)
    with pytest.raises(OriginRefused, match=MARKER_MODULE):
        plans.step_plan(instance, run, ["touch"], None)
    assert loads["jobs"] == [] and plans.misses == 0
