"""Execution plans of one run, kept by a warm step process between its steps.

Dagster's ``dagster api execute_step`` builds each step's plan from scratch: it loads the
job, resolves the run config for every op of the job and builds the plan of the whole
job, then keeps the one step. A warm step process that runs many steps of one run did
that work again for every step, so a step cost time in proportion to the size of its job
(a run of N steps, O(N²) in all).

What does not change between the steps of a run is kept, per run: the job, its resolved
run config and the plan of the whole job. A step's plan is then the subset of that plan
to its one step, with the step's own known state (retry counts, ready outputs), exactly
as Dagster's ``ExecutionPlan.build`` makes it:

- the whole-job plan depends on the known state only through its dynamic mappings
  (which dynamic steps exist), so those are part of the key;
- a step's subset is made from a copy of the whole-job plan's step dictionaries:
  executing a step that yields dynamic outputs adds resolved steps to its plan, and
  that must not leak into the next step's plan;
- the known state, which Dagster reads while executing (the attempt number of a
  retried step, the outputs an input loads), is the step's own, never a cached one.

The cache is small and bounded (a worker runs the steps of a few runs at a time);
the least recently used run is dropped first. It loads a run's job from the run's own code
origin, so that is the origin it checks against the worker's code locations, before
anything is imported.

Dagster's step context creation resolves the run config once more
(``create_context_creation_data``), again for every op of the job. While a step runs,
``patches.reuse_resolved_run_config`` makes that call take the run's resolved config from
its ``RunPlan`` when it is for the same job definition and run config (an immutable value,
which Dagster's in-process executor shares between all the steps of a run, too); any other
call goes to Dagster's function unchanged.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from dagster import DagsterInstance
from dagster._core.definitions.job_definition import JobDefinition
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.origin import JobPythonOrigin
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster._utils.hosted_user_process import recon_job_from_origin

from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.origins import origin_allowed

DEFAULT_CACHED_PLANS = 8


class OriginRefused(Exception):
    """The run's job is not from one of the worker's code locations: never loaded."""


@dataclass(frozen=True)
class RunPlan:
    """What the steps of one run share."""

    recon_job: ReconstructableJob
    job_def: JobDefinition
    run_config: Mapping[str, object]
    resolved_run_config: ResolvedRunConfig
    plan: ExecutionPlan  # of the whole job

    def for_step(self, step_keys: list[str], known_state: KnownExecutionState) -> ExecutionPlan:
        """The plan of ``step_keys``, with their known state, as Dagster would build it."""
        whole = self.plan._replace(
            step_dict=dict(self.plan.step_dict),
            step_dict_by_key=dict(self.plan.step_dict_by_key),
        )
        if step_keys != whole.step_keys_to_execute:
            whole = whole.build_subset_plan(step_keys, self.job_def, self.resolved_run_config)
        return whole._replace(known_state=known_state)


class PlanCache:
    """The whole-job plans of the last few runs this process executed steps of, for jobs
    from ``locations`` only."""

    def __init__(
        self, locations: tuple[CodeLocation, ...], size: int = DEFAULT_CACHED_PLANS
    ) -> None:
        self.locations = locations
        self.size = size
        self._plans: OrderedDict[tuple[str, str], RunPlan] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()

    def refusal(self, run: DagsterRun) -> str | None:
        """Why the job of ``run`` must not be loaded here, or None."""
        if run.job_code_origin is None:
            return f"Refused: run {run.run_id} has no code origin to load its job from."
        return origin_allowed(run.job_code_origin, self.locations)

    def step_plan(
        self,
        instance: DagsterInstance,
        run: DagsterRun,
        step_keys: list[str],
        known_state: KnownExecutionState | None,
    ) -> tuple[RunPlan, ExecutionPlan]:
        """What the run's steps share, and the plan of one step of ``run``."""
        known_state = known_state or KnownExecutionState()
        key = (run.run_id, _mappings_key(known_state))
        run_plan = self._plans.get(key)
        if run_plan is None:
            refusal = self.refusal(run)
            if refusal is not None:
                raise OriginRefused(refusal)
            self.misses += 1
            run_plan = _build(instance, run, known_state)
            self._plans[key] = run_plan
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
        else:
            self.hits += 1
            self._plans.move_to_end(key)
        return run_plan, run_plan.for_step(step_keys, known_state)


def _mappings_key(known_state: KnownExecutionState) -> str:
    # {step key: {output name: [mapping keys] or None}}: plain JSON.
    return json.dumps(known_state.dynamic_mappings, sort_keys=True)


def _build(instance: DagsterInstance, run: DagsterRun, known_state: KnownExecutionState) -> RunPlan:
    # As dagster._cli.api._execute_step_command_body and create_execution_plan do it.
    if run.has_repository_load_data:
        snapshot_id = run.execution_plan_snapshot_id
        assert snapshot_id is not None
        repository_load_data = instance.get_execution_plan_snapshot(
            snapshot_id
        ).repository_load_data
    else:
        repository_load_data = None
    recon_job = (
        recon_job_from_origin(cast("JobPythonOrigin", run.job_code_origin))
        .with_repository_load_data(repository_load_data)
        .get_subset(
            op_selection=run.resolved_op_selection,
            asset_selection=run.asset_selection,
            asset_check_selection=run.asset_check_selection,
        )
    )
    job_def = recon_job.get_definition()
    resolved_run_config = ResolvedRunConfig.build(job_def, run.run_config)
    plan = ExecutionPlan.build(
        job_def,
        resolved_run_config,
        step_keys_to_execute=None,
        known_state=known_state,
        repository_load_data=repository_load_data,
    )
    return RunPlan(recon_job, job_def, run.run_config, resolved_run_config, plan)
