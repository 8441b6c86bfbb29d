"""Run one step in this process: the Dagster part of the worker.

Dagster's own ``dagster api execute_step`` body does the work (load the job from its
origin, build the plan for one step, execute it, write events to the instance), minus
the process start-up that costs seconds per step. Two checks come first, because a
message can be delivered again after its attempt already ended:

- the run is finished or being cancelled: do not start;
- the event log already has this attempt's ending (a worker died after finishing the
  step but before recording it): record that outcome, do not run again.

A takeover (an earlier delivery started the attempt and lost its lease) re-executes the
same attempt and says so in an engine event naming the lost worker and the delivery.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from enum import Enum

from dagster import DagsterInstance, DagsterRunStatus
from dagster._cli.api import _execute_step_command_body
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value
from dagster._utils.error import serializable_error_info_from_exc_info
from dagster_shared.record import copy

from dagster_taskiq.attempts import AttemptOutcome, attempt_outcome
from dagster_taskiq.messages import StepMessage
from dagster_taskiq.worker.attempt_context import StepAttempt, set_current_attempt


class Outcome(Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # cancel requested: stopped by an interrupt
    NOT_STARTED = "not_started"  # the run is finished or cancelling
    ALREADY_ENDED = "already_ended"  # the event log has the ending from an earlier delivery
    # Dagster raised before the step had an ending in the event log: typically the
    # database went away mid-write. Not the user's failure: given back, to run again.
    NO_ENDING = "no_ending"


@dataclass(frozen=True)
class StepTask:
    """What the supervisor hands a step process. Picklable."""

    message: StepMessage
    fencing_token: int
    worker_id: str
    delivery: int
    previous_worker: str | None  # set on a takeover


@dataclass(frozen=True)
class StepResult:
    idempotency_key: str
    outcome: Outcome
    succeeded: bool
    detail: str | None
    seconds: float


def load_step_args(step_args: str) -> ExecuteStepArgs:
    args = deserialize_value(step_args, ExecuteStepArgs)
    keys = args.step_keys_to_execute or []
    if len(keys) != 1:
        raise ValueError(f"expected exactly one step key, got {keys!r}")
    # This worker's own instance is used, never a reference from a message, and redelivery
    # of a started attempt is handled here rather than refused by Dagster's verify_step.
    return copy(args, instance_ref=None, should_verify_step=False)


def execute(instance: DagsterInstance, task: StepTask) -> StepResult:
    message = task.message
    started = time.monotonic()

    def result(outcome: Outcome, succeeded: bool, detail: str | None = None) -> StepResult:
        return StepResult(
            message.idempotency_key, outcome, succeeded, detail, time.monotonic() - started
        )

    args = load_step_args(message.step_args)
    run = instance.get_run_by_id(message.run_id)
    if run is None:
        return result(
            Outcome.FAILED,
            False,
            f"Run {message.run_id} is not in this worker's Dagster instance: the worker and "
            "the run must share instance storage (DAGSTER_HOME / dagster.yaml).",
        )
    # First the ending: an attempt that ended before its worker died is recorded as it
    # ended, even when the run has finished since.
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
        for event in _execute_step_command_body(args, instance, run):
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
