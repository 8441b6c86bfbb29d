"""What the supervisor and a step process say to each other over their pipe.

Dagster-free, so that the supervisor does not import dagster: everything that needs
Dagster (reading the step arguments, checking the job's origin, running the step)
happens in the step process.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dagster_taskiq.core.messages import StepMessage


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
    """What the supervisor hands a step process to run. Picklable."""

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


@dataclass(frozen=True)
class VetRequest:
    """Asks a step process to read a message's step arguments, before any claim. The
    arguments must be for the message's own run and step."""

    step_args: str
    run_id: str
    step_key: str


@dataclass(frozen=True)
class Vetting:
    """What a step process found in a message's step arguments."""

    malformed: str | None = None  # they do not deserialize: never executed
    refusal: str | None = None  # the job's code is not one of the worker's locations
