"""What the worker does with a message, as pure functions.

At each point where the protocol branches, the supervisor describes what it found (a
decode or vetting result, the ledger's claim, the step process's result, the lease's
state) and carries out the action returned. Nothing here does I/O, reads a clock, starts
a thread or keeps state, so every branch is tested over its whole input space
(``tests/unit/test_worker_decisions.py``), in the manner of Powertools' idempotency state
machine: a record's state and what happened map to what to do.

In a message's order:

- ``on_receipt``: hand it to a slot, or give it back when the worker is stopping.
- ``after_check``: decoded and vetted: reject it, hide it for a while, or claim the step.
- ``claim_visibility``: claim under the receive's visibility, or hide it for a lease first.
- ``after_claim``: the ledger's answer: run, complete as refused, delete, hide, reject.
- ``after_step``: the step's result and the lease: complete, finish the cancel, release, or
  leave it.
- ``after_fenced_write``: delete only once a write under this worker's token updated the
  row (docs/protocol.md, "Why a message is deleted only after a fenced completion").

Dagster-free, like the whole supervisor.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import overload

from dagster_taskiq.core.ledger import Claim, ClaimOutcome
from dagster_taskiq.worker.heartbeat import VISIBILITY_MARGIN, LeaseState, lease_within
from dagster_taskiq.worker.tasks import Outcome, StepResult, Vetting

# Seconds a step given back after a fault stays hidden: a short outage of the database or
# the network should not use up the message's deliveries.
GIVE_BACK_DELAY = 5
# A claim's lease is capped by the receive's visibility (see ``heartbeat``). A message
# left with less than this before it may be seen again is hidden for its lease first.
MIN_CLAIM_LEASE_SECONDS = 3.0
# The ledger could not be reached for a claim: the message comes back after this, and
# the slot waits this long before its next message, so that an outage is not spun on.
LEDGER_UNREACHABLE_HIDE_SECONDS = 10
LEDGER_UNREACHABLE_PAUSE_SECONDS = 5.0

# What a step given back says in its ledger row (the ``error`` column).
RELEASED_AT_SHUTDOWN = "released: worker shutting down"
NO_RESULT = "no result from the step process"
NO_ENDING_PREFIX = "given back: the step could not record its ending: "


# -- what was found ------------------------------------------------------------------------


class Check(enum.Enum):
    """What reading a message found, before any claim."""

    UNDECODABLE = "undecodable"  # decode refused it: forged, oversized, malformed, a new schema
    UNREAD = "unread"  # no step process could read its step arguments
    MALFORMED = "malformed"  # its step arguments do not load, or are another step's
    REFUSED = "refused"  # the job's code is not one of this worker's locations
    ACCEPTED = "accepted"


@dataclass(frozen=True)
class MessageCheck:
    outcome: Check
    reason: str = ""  # UNDECODABLE: decode's reason ("forged", "oversized", ...)
    detail: str = ""  # why it was not accepted

    @classmethod
    def undecodable(cls, reason: str, detail: str) -> MessageCheck:
        return cls(Check.UNDECODABLE, reason, detail)

    @classmethod
    def unread(cls, error: str) -> MessageCheck:
        return cls(Check.UNREAD, detail=error)

    @classmethod
    def vetted(cls, vetting: Vetting) -> MessageCheck:
        if vetting.malformed is not None:  # never executed, whatever else it says
            return cls(Check.MALFORMED, detail=vetting.malformed)
        if vetting.refusal is not None:
            return cls(Check.REFUSED, detail=vetting.refusal)
        return cls(Check.ACCEPTED)

    @property
    def refusal(self) -> str | None:
        return self.detail if self.outcome is Check.REFUSED else None


class Unreachable(enum.Enum):
    """A ledger call that raised ``LedgerUnavailable``: no answer at all."""

    LEDGER = "ledger"


LEDGER_UNREACHABLE = Unreachable.LEDGER


# -- what to do ----------------------------------------------------------------------------


class HideReason(enum.Enum):
    WORKER_STOPPING = "worker_stopping"  # received as the worker stops: to another at once
    STEP_PROCESS_GONE = "step_process_gone"  # nothing here could read the step arguments
    HELD_ELSEWHERE = "held_elsewhere"  # a live lease elsewhere: look when it would run out
    LEDGER_UNREACHABLE = "ledger_unreachable"


class DeleteReason(enum.Enum):
    DUPLICATE = "duplicate"  # the ledger row is terminal already
    CANCELLED = "cancelled"  # cancel was requested before the step started
    ENDED = "ended"  # its ending is recorded under this worker's token


class LeaveReason(enum.Enum):
    LEASE_LOST = "lease_lost"  # another delivery may hold the step now
    NOT_HELD = "not_held"  # a write under this worker's token updated no row


@dataclass(frozen=True)
class HandOver:
    """Give the message to an idle slot."""


@dataclass(frozen=True)
class ClaimStep:
    """Claim the step in the ledger (its message's visibility first: ``claim_visibility``)."""


@dataclass(frozen=True)
class ClaimUnder:
    """Claim under the receive's visibility, which leaves a useful lease."""

    hidden_until: float


@dataclass(frozen=True)
class HideForClaim:
    """Hide the message for a full lease, then claim; if SQS cannot be reached, leave it
    to SQS unclaimed. ``hidden_until``: how long it then surely stays hidden (the timeout
    runs from SQS's handling of the call, after the ``now`` it was computed from)."""

    seconds: int
    hidden_until: float


@dataclass(frozen=True)
class Run:
    """Run the step: the claim gave this worker the token."""


@dataclass(frozen=True)
class Complete:
    """Record the attempt's ending under this worker's token; the message is deleted
    only if that updated the row (``after_fenced_write``)."""

    succeeded: bool
    error: str | None
    duplicate: bool  # the ending was already in the event log: not executed again


@dataclass(frozen=True)
class FinishCancel:
    """Record CANCELLED under this worker's token, then as ``Complete``."""

    detail: str | None


@dataclass(frozen=True)
class Release:
    """Give the lease up, saying why, and hide the message for ``hide_seconds``: the next
    delivery takes the step over."""

    reason: str
    hide_seconds: int


@dataclass(frozen=True)
class Delete:
    reason: DeleteReason


@dataclass(frozen=True)
class Hide:
    """Change the message's visibility, then pause the slot for ``pause_seconds``."""

    seconds: int
    reason: HideReason
    pause_seconds: float = 0.0


@dataclass(frozen=True)
class Reject:
    """Never executed: record the rejection, and make the message visible again at once,
    so that SQS dead-letters it after its deliveries."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Leave:
    """Record nothing, delete nothing: SQS delivers it again and the ledger decides."""

    reason: LeaveReason


# -- the decisions -------------------------------------------------------------------------


def on_receipt(*, stopping: bool) -> HandOver | Hide:
    if stopping:
        return Hide(0, HideReason.WORKER_STOPPING)
    return HandOver()


def after_check(check: MessageCheck) -> Reject | Hide | ClaimStep:
    match check.outcome:
        case Check.UNDECODABLE:
            return Reject(check.reason, check.detail)
        case Check.UNREAD:
            return Hide(GIVE_BACK_DELAY, HideReason.STEP_PROCESS_GONE)
        case Check.MALFORMED:
            return Reject("malformed", check.detail)
        case Check.REFUSED | Check.ACCEPTED:
            # A refused step is claimed too, so that its failure is recorded once.
            return ClaimStep()


def claim_visibility(
    received_hidden_until: float, lease_seconds: int, now: float
) -> ClaimUnder | HideForClaim:
    """Until when the message is surely hidden, for a claim's lease to end before it: the
    receive's visibility, or, for a message that waited too long to leave a useful lease
    (or of unknown visibility, 0), a new one as long as the lease. All on one monotonic
    clock."""
    if lease_within(received_hidden_until, lease_seconds, now) >= min(
        MIN_CLAIM_LEASE_SECONDS, lease_seconds
    ):
        return ClaimUnder(received_hidden_until)
    seconds = math.ceil(lease_seconds + VISIBILITY_MARGIN)
    return HideForClaim(seconds, now + seconds)


@overload
def after_claim(claim: Unreachable, *, refusal: str | None) -> Hide: ...


@overload
def after_claim(
    claim: Claim, *, refusal: str | None
) -> Run | Complete | Delete | Hide | Reject: ...


def after_claim(
    claim: Claim | Unreachable, *, refusal: str | None
) -> Run | Complete | Delete | Hide | Reject:
    """``refusal``: the vetting's, for a step whose code this worker may not run."""
    if claim is Unreachable.LEDGER:
        return Hide(
            LEDGER_UNREACHABLE_HIDE_SECONDS,
            HideReason.LEDGER_UNREACHABLE,
            pause_seconds=LEDGER_UNREACHABLE_PAUSE_SECONDS,
        )
    match claim.outcome:
        case ClaimOutcome.CLAIMED:
            if refusal is not None:
                return Complete(succeeded=False, error=refusal, duplicate=False)
            return Run()
        case ClaimOutcome.DUPLICATE:
            return Delete(DeleteReason.DUPLICATE)
        case ClaimOutcome.CANCELLED:
            return Delete(DeleteReason.CANCELLED)
        case ClaimOutcome.BUSY:
            return Hide(int(claim.lease_remaining_seconds) + 1, HideReason.HELD_ELSEWHERE)
        case ClaimOutcome.UNKNOWN:
            return Reject("unknown_key", "no ledger record for this idempotency key")
        case ClaimOutcome.MISMATCH:
            return Reject("mismatch", "the payload differs from the one launched")


def after_step(
    lease: LeaseState, result: StepResult | None, failure: str | None = None
) -> Leave | Release | FinishCancel | Complete:
    """``result``: what the step process answered; None when it answered nothing, and
    ``failure`` says why (it died, or this side failed)."""
    if lease is LeaseState.LOST:
        return Leave(LeaveReason.LEASE_LOST)
    if lease is LeaseState.RELEASING:
        return Release(RELEASED_AT_SHUTDOWN, 0)  # at once to another worker
    if result is None:
        return Release(failure or NO_RESULT, GIVE_BACK_DELAY)
    match result.outcome:
        case Outcome.NO_ENDING:
            return Release(f"{NO_ENDING_PREFIX}{result.detail}", GIVE_BACK_DELAY)
        case Outcome.INTERRUPTED | Outcome.NOT_STARTED:
            return FinishCancel(result.detail)
        case Outcome.SUCCEEDED | Outcome.FAILED | Outcome.ALREADY_ENDED:
            return Complete(
                succeeded=result.succeeded,
                error=None if result.succeeded else result.detail,
                duplicate=result.outcome is Outcome.ALREADY_ENDED,
            )


def after_fenced_write(*, updated: bool) -> Delete | Leave:
    if updated:
        return Delete(DeleteReason.ENDED)
    return Leave(LeaveReason.NOT_HELD)
