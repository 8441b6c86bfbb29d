"""Run one step in this process: the Dagster part of the worker.

Dagster's own ``dagster api execute_step`` body does the work (load the job from its
origin, build the plan for one step, execute it, write events to the instance), minus
the process start-up that costs seconds per step, and minus rebuilding the job's plan for
every step: the plans of recent runs are kept (``worker/plans.py``). Two checks come
first, because a message can be delivered again after its attempt already ended:

- the run is finished or being cancelled: do not start;
- the event log already has this attempt's ending (a worker died after finishing the
  step but before recording it): record that outcome, do not run again.

A takeover (an earlier delivery started the attempt and lost its lease) re-executes the
same attempt and says so in an engine event naming the lost worker and the delivery.

What is loaded is the run's own code origin, so that is what the code-location
allow-list judges wherever the job could be loaded (read ahead, executed), and the
message's step arguments must be for that run, that step and that same origin.

The step process reads a message's run and builds the step's plan while the supervisor
claims the message (``read_ahead``): the claim's round trip to the ledger and these reads
overlap instead of following each other on every step's way in.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from dagster import DagsterInstance, DagsterRunStatus, MetadataValue
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.execution.api import execute_plan_iterator
from dagster._core.execution.context_creation_job import create_context_free_log_manager
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.storage.dagster_run import DagsterRun
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value
from dagster._utils.error import serializable_error_info_from_exc_info
from dagster_shared.record import copy

from dagster_taskiq.executor.attempt_outcomes import AttemptOutcome, attempt_outcome
from dagster_taskiq.patches import reuse_resolved_run_config, set_up_as_execute_step
from dagster_taskiq.worker.attempt_context import StepAttempt, set_current_attempt
from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.origins import origin_allowed, quoted
from dagster_taskiq.worker.plans import OriginRefused, PlanCache, RunPlan
from dagster_taskiq.worker.tasks import Outcome, StepResult, StepTask, VetRequest, Vetting

__all__ = [
    "Outcome",
    "ReadAhead",
    "StepResult",
    "StepTask",
    "Vetting",
    "execute",
    "load_refusal",
    "load_step_args",
    "read_ahead",
    "vet",
]

# A run read ahead is used only this soon after: its status decides whether the step
# starts, and a claim that waited on the ledger must not start a step on an old reading.
READ_AHEAD_FRESH_SECONDS = 1.0


# Vetted, then read ahead and executed: one deserialization. One entry: a step process
# handles one message at a time, and arguments can be megabytes.
@functools.lru_cache(maxsize=1)
def load_step_args(step_args: str) -> ExecuteStepArgs:
    args = deserialize_value(step_args, ExecuteStepArgs)
    keys = args.step_keys_to_execute or []
    if len(keys) != 1:
        raise ValueError(f"expected exactly one step key, got {keys!r}")
    # This worker's own instance is used, never a reference from a message, and redelivery
    # of a started attempt is handled here rather than refused by Dagster's verify_step.
    return copy(args, instance_ref=None, should_verify_step=False)


def vet(request: VetRequest, locations: tuple[CodeLocation, ...]) -> Vetting:
    """Read a message's step arguments before it is claimed: malformed ones, or ones for
    another run or step than the message's, are never executed, and a job from outside
    the worker's code locations is refused. Never raises: whatever a message holds, the
    answer is a Vetting."""
    try:
        return _vet(request, locations)
    except Exception as e:
        return Vetting(malformed=f"step arguments could not be vetted: {type(e).__name__}: {e}")


def _vet(request: VetRequest, locations: tuple[CodeLocation, ...]) -> Vetting:
    try:
        args = load_step_args(request.step_args)
    except Exception as e:
        return Vetting(malformed=f"step arguments do not deserialize: {e}")
    if args.run_id != request.run_id:
        return Vetting(
            malformed=f"step arguments are for run {quoted(args.run_id)}, not for the "
            f"message's run {quoted(request.run_id)}"
        )
    step_keys = list(args.step_keys_to_execute or [])
    if step_keys != [request.step_key]:
        return Vetting(
            malformed=f"step arguments are for steps {quoted(step_keys)}, not for the "
            f"message's step {quoted(request.step_key)}"
        )
    return Vetting(refusal=origin_allowed(args.job_origin, locations))


def load_refusal(run: DagsterRun, args: ExecuteStepArgs, plans: PlanCache) -> str | None:
    """Why the job of ``run`` must not be loaded for these step arguments, or None.

    The job is loaded from the run's own origin, so that origin is the one the allow-list
    judges; step arguments that name another origin (or another run) are not this run's.
    """
    refusal = plans.refusal(run)
    if refusal is None and (args.run_id != run.run_id or args.job_origin != run.job_code_origin):
        refusal = (
            f"Refused: the step arguments name another run or code origin than run "
            f"{run.run_id}'s own."
        )
    return refusal


@dataclass(frozen=True)
class ReadAhead:
    """A message's run and its step's plan, read before the message is claimed."""

    step_args: str
    run: DagsterRun | None
    plan: tuple[RunPlan, ExecutionPlan] | None
    read_at: float = field(default_factory=time.monotonic)

    def run_for(self, message_step_args: str, run_id: str) -> DagsterRun | None:
        """The run read ahead, if it is this message's and fresh enough to go by."""
        fresh = time.monotonic() - self.read_at <= READ_AHEAD_FRESH_SECONDS
        if not fresh or self.run is None or message_step_args != self.step_args:
            return None
        return self.run if self.run.run_id == run_id else None


def read_ahead(instance: DagsterInstance, step_args: str, plans: PlanCache) -> ReadAhead | None:
    """Read a vetted message's run and build its step's plan, as ``execute`` would.

    Nothing is written: the message is not claimed yet, and may never be. Whatever fails
    here is left to ``execute``, which does the same again and reports the failure.
    """
    try:
        args = load_step_args(step_args)
        run = instance.get_run_by_id(args.run_id)
        plan = None
        if run is not None and not run.is_finished and load_refusal(run, args, plans) is None:
            _prepare_environment(instance, run)
            plan = plans.step_plan(
                instance, run, list(args.step_keys_to_execute or []), args.known_state
            )
        return ReadAhead(step_args, run, plan)
    except Exception:
        return None


def _prepare_environment(instance: DagsterInstance, run: DagsterRun) -> None:
    # What ``dagster api execute_step`` does before it loads the job.
    location_name = run.remote_job_origin.location_name if run.remote_job_origin else None
    instance.inject_env_vars(location_name)
    set_up_as_execute_step()


def execute(
    instance: DagsterInstance, task: StepTask, plans: PlanCache, ahead: ReadAhead | None = None
) -> StepResult:
    message = task.message
    started = time.monotonic()

    def result(outcome: Outcome, succeeded: bool, detail: str | None = None) -> StepResult:
        return StepResult(
            message.idempotency_key, outcome, succeeded, detail, time.monotonic() - started
        )

    args = load_step_args(message.step_args)
    run = ahead.run_for(message.step_args, message.run_id) if ahead is not None else None
    plan = ahead.plan if ahead is not None and run is not None else None
    if run is None:
        run = instance.get_run_by_id(message.run_id)
    if run is None:
        return result(
            Outcome.FAILED,
            False,
            f"Run {message.run_id} is not in this worker's Dagster instance: the worker and "
            "the run must share instance storage (DAGSTER_HOME / dagster.yaml).",
        )
    refusal = load_refusal(run, args, plans)
    if refusal is not None:
        return result(Outcome.FAILED, False, refusal)
    # First the ending: an attempt that ended before its worker died is recorded as it
    # ended, even when the run has finished since. Only an attempt that was claimed before
    # (a takeover, a step given back) or delivered before can have one: the first claim of
    # a key (fencing token 1) on its first delivery skips reading the run's endings.
    ended = None
    if task.fencing_token > 1 or task.delivery > 1:
        ended = attempt_outcome(instance, message.run_id, message.step_key, message.attempt)
    if ended is not None:
        return result(
            Outcome.ALREADY_ENDED,
            ended is AttemptOutcome.SUCCEEDED,
            "the event log already has this attempt's ending from an earlier delivery",
        )
    if run.is_finished or run.status == DagsterRunStatus.CANCELING:
        return result(Outcome.NOT_STARTED, False, f"run is {run.status.value}")

    if task.previous_worker:
        instance.report_engine_event(
            f"Worker {task.previous_worker} lost its lease on step {message.step_key} "
            f"(attempt {message.attempt + 1}); re-executing it on worker {task.worker_id}, "
            f"delivery {task.delivery}.",
            run,
            EngineEventData(),
            step_key=message.step_key,
        )

    set_current_attempt(
        StepAttempt(
            idempotency_key=message.idempotency_key,
            run_id=message.run_id,
            step_key=message.step_key,
            attempt=message.attempt,
            fencing_token=task.fencing_token,
            worker_id=task.worker_id,
            delivery=task.delivery,
        )
    )
    ending: DagsterEvent | None = None
    try:
        for event in step_events(args, instance, run, plans, plan):
            if event.step_key == message.step_key and event.event_type in _ENDINGS:
                ending = event
    except (KeyboardInterrupt, DagsterExecutionInterruptedError):
        return result(Outcome.INTERRUPTED, False, "interrupted: cancellation was requested")
    except Exception:
        error = serializable_error_info_from_exc_info(sys.exc_info())
        if ending is None:
            return result(Outcome.NO_ENDING, False, f"framework error: {error.to_string()}")
    finally:
        set_current_attempt(None)

    if ending is None:
        return result(Outcome.FAILED, False, "the step ended without a success or failure event")
    if ending.event_type == DagsterEventType.STEP_SUCCESS:
        return result(Outcome.SUCCEEDED, True)
    return result(Outcome.FAILED, False, _failure_message(ending))


def step_events(
    args: ExecuteStepArgs,
    instance: DagsterInstance,
    run: DagsterRun,
    plans: PlanCache,
    plan: tuple[RunPlan, ExecutionPlan] | None = None,
) -> Iterator[DagsterEvent]:
    """Dagster's ``dagster api execute_step`` body (``dagster._cli.api``), event for
    event, with the job and its plan taken from ``plans`` (see ``worker/plans.py``), or
    read ahead (``plan``), instead of being rebuilt for every step.
    ``args.should_verify_step`` is always off here (see ``load_step_args``), and a
    finished or cancelling run never gets this far: ``execute`` answers NOT_STARTED for
    it first."""
    step_keys = list(args.step_keys_to_execute or [])
    single_step_key = step_keys[0] if len(step_keys) == 1 else None
    try:
        refusal = load_refusal(run, args, plans)
        if refusal is not None:  # checked by ``execute`` already; here so none can skip it
            raise OriginRefused(refusal)
        if plan is None:  # read ahead: the environment was prepared then
            _prepare_environment(instance, run)

        log_manager = create_context_free_log_manager(instance, run)
        yield DagsterEvent.step_worker_started(
            log_manager,
            run.job_name,
            message="Step worker started"
            + (f' for "{single_step_key}".' if single_step_key else "."),
            metadata={"pid": MetadataValue.text(str(os.getpid()))},
            step_key=single_step_key,
        )
        run_plan, execution_plan = plan or plans.step_plan(
            instance, run, step_keys, args.known_state
        )
        with reuse_resolved_run_config(run_plan):
            yield from execute_plan_iterator(
                execution_plan,
                run_plan.recon_job,
                run,
                instance,
                run_config=run.run_config,
                retry_mode=args.retry_mode,
            )
    except (KeyboardInterrupt, DagsterExecutionInterruptedError):
        yield instance.report_engine_event(
            message="Step execution terminated by interrupt",
            dagster_run=run,
            step_key=single_step_key,
        )
        raise
    except Exception:
        yield instance.report_engine_event(
            "An exception was thrown during step execution that is likely a framework error,"
            " rather than an error in user code.",
            run,
            EngineEventData.engine_error(serializable_error_info_from_exc_info(sys.exc_info())),
            step_key=single_step_key,
        )
        raise


_ENDINGS = {
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
}


def _failure_message(event: DagsterEvent) -> str:
    if event.event_type == DagsterEventType.STEP_UP_FOR_RETRY:
        return "up for retry"
    data = event.step_failure_data
    if data is None or data.error is None:
        return event.message or "step failed"
    # Dagster wraps the op's exception; the ledger keeps both ends of the chain.
    error, root = data.error, data.error
    while root.cause is not None:
        root = root.cause
    summary = error.message.strip()
    if root is not error:
        summary += f" Caused by {root.message.strip()}"
    return summary
