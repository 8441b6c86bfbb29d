"""How long a step may sit in each non-terminal ledger state before it is unhealthy.

No state is healthy for ever: a step whose worker died with its last delivery, whose
message SQS deleted, that every worker rejects, or whose cancel nobody finishes would
otherwise keep its run waiting for ever, for instance while the DLQ processor is down.
``judge`` says, for one ledger record, whether its bound has passed, why, and how the
executor closes the row so that a late delivery never starts it. Each bound is derived
from the executor's settings so that it never fires on a step that can still run:

- RUNNING under a live lease: healthy, its worker heartbeats.
- RUNNING under an expired lease, with its last delivery used: SQS moves its message to
  the DLQ at its next receive. Past ``dead_letter_grace`` after the lease expired, the
  DLQ processor should have marked it: presumed dead-lettered.
- RUNNING under an expired lease, with deliveries left: back in the queue, waiting like
  a queued step; bounded by ``pickup_timeout`` (from the lease expiry) and by the queue's
  message retention (from the launch).
- ENQUEUED: ``pickup_timeout``, the message retention, and a message rejected by workers
  as many times as it can be delivered (it can only be in the DLQ: presumed
  dead-lettered, with the rejection's reason).
- CANCEL_REQUESTED with no live lease: closed after ``CANCEL_GRACE_SECONDS``.

Pure and Dagster-free: the ledger's clock gives the ages; the step handler acts.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dagster_taskiq.core.ledger import Status, StepRecord
from dagster_taskiq.core.messages import safe_text

# SQS's longest receive wait: while a worker polls the queue, a visible message is
# received within it (and, past its delivery budget, moved to the DLQ by that receive).
RECEIVE_WAIT_SECONDS = 20.0
# How long a message may stay hidden after its lease expired: a worker hides it a little
# longer than its lease (2 s), or for a breath after giving a step back (5 s).
VISIBILITY_MARGIN_SECONDS = 10.0
# What the DLQ processor is given by default to mark a dead letter: its event source
# polls the DLQ continuously, and a record takes a second or two (a retry, a little more).
DEFAULT_DEAD_LETTER_TIMEOUT = 60
# A cancel that no lease holds is finished by the next worker that receives the message:
# at most a visibility margin and a receive wait after the lease ended.
CANCEL_GRACE_SECONDS = VISIBILITY_MARGIN_SECONDS + RECEIVE_WAIT_SECONDS
# How much of a row's last error a reason quotes.
ERROR_QUOTE_CHARS = 500

# What a worker's rejection reason means, for the person reading the failed step.
REJECTION_HINTS = {
    "forged": "Its signature does not verify: the executor and the workers must use the "
    "same signing key.",
    "unknown_version": "The workers do not know its message version: run the same "
    "dagster-taskiq version in the executor and the workers.",
    "oversized": "It is larger than the workers accept.",
}


def dead_letter_grace(dead_letter_timeout: float) -> float:
    """Seconds after the lease of a step's last delivery expired before the executor
    presumes the step dead-lettered: its message becomes visible within the visibility
    margin, the next receive (within the receive wait, while a worker polls) moves it to
    the DLQ, and the DLQ processor then has ``dead_letter_timeout`` to mark the step."""
    return VISIBILITY_MARGIN_SECONDS + RECEIVE_WAIT_SECONDS + max(0.0, dead_letter_timeout)


@dataclass(frozen=True)
class HealthBounds:
    """The executor settings the bounds derive from."""

    max_receive_count: int  # the delivery budget: the queue's redrive maxReceiveCount
    message_retention: int  # seconds SQS keeps a message after it was sent
    pickup_timeout: int | None = None  # seconds a queued step may wait for a worker
    dead_letter_timeout: float = DEFAULT_DEAD_LETTER_TIMEOUT

    @property
    def retention_bound(self) -> float:
        # A receive just before the retention ends may still claim the step.
        return self.message_retention + VISIBILITY_MARGIN_SECONDS + RECEIVE_WAIT_SECONDS


class Action(enum.Enum):
    """How the executor closes the row, conditionally, before it reports the step."""

    # RUNNING (or ENQUEUED, every delivery rejected) -> DEAD_LETTERED, presumed
    PRESUME_DEAD_LETTERED = "presume_dead_lettered"
    ABANDON = "abandon"  # ENQUEUED, or RUNNING under an expired lease -> FAILED
    CLOSE_CANCEL = "close_cancel"  # CANCEL_REQUESTED -> CANCELLED


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str


def judge(
    record: StepRecord, bounds: HealthBounds, rejection: Mapping[str, Any] | None = None
) -> Verdict | None:
    """The verdict on a non-terminal record whose bound has passed; None while it may
    still run. ``rejection``: the most rejected message of its key (``rejections_of``)."""
    if record.status is Status.RUNNING:
        return _running(record, bounds)
    if record.status is Status.ENQUEUED:
        return _enqueued(record, bounds, rejection)
    if record.status is Status.CANCEL_REQUESTED:
        return _cancel_requested(record)
    return None


def _unheld_seconds(record: StepRecord) -> float | None:
    """Seconds since the lease expired; None while it is live."""
    if record.lease_live:
        return None
    expired = record.lease_expired_seconds
    if expired is None:  # never leased: as long as the row is unchanged
        return record.idle_seconds
    return expired if expired >= 0 else None


def _key(record: StepRecord) -> str:
    return safe_text(record.step_key, ERROR_QUOTE_CHARS)


def _queue(record: StepRecord) -> str:
    return record.queue_url or "its queue"


def _last_error(record: StepRecord) -> str:
    return f" (last: {safe_text(record.error, ERROR_QUOTE_CHARS)})" if record.error else ""


def _running(record: StepRecord, bounds: HealthBounds) -> Verdict | None:
    since = _unheld_seconds(record)
    if since is None:
        return None
    budget = bounds.max_receive_count
    if record.deliveries >= budget:
        if since <= dead_letter_grace(bounds.dead_letter_timeout):
            return None
        return Verdict(
            Action.PRESUME_DEAD_LETTERED,
            f"Step {_key(record)} used its last of {budget} deliveries and its worker stopped "
            f"heartbeating {since:.0f} s ago{_last_error(record)}; its message is in the "
            "dead-letter queue, which the DLQ processor should have marked within "
            f"{bounds.dead_letter_timeout:.0f} s: check the DLQ processor function, its "
            "errors and its event source. The ledger records the step as presumed "
            "dead-lettered, so a late delivery never starts it.",
        )
    if bounds.pickup_timeout and since > bounds.pickup_timeout + VISIBILITY_MARGIN_SECONDS:
        return Verdict(
            Action.ABANDON,
            f"Step {_key(record)} went back to the queue {since:.0f} s ago, after "
            f"{record.deliveries} of its {budget} deliveries, when its worker stopped "
            f"heartbeating{_last_error(record)}, and no worker took it again within the "
            f"pick-up timeout of {bounds.pickup_timeout} s. Are workers running and "
            f"consuming {_queue(record)}?",
        )
    return _retention(record, bounds)


def _retention(record: StepRecord, bounds: HealthBounds) -> Verdict | None:
    if record.age_seconds <= bounds.retention_bound:
        return None
    return Verdict(
        Action.ABANDON,
        f"Step {_key(record)} was queued {record.age_seconds:.0f} s ago and no worker holds "
        f"it: its message has outlived the queue's message retention of "
        f"{bounds.message_retention} s, so SQS deleted it and no worker will receive it. "
        f"Are workers running and consuming {_queue(record)}?",
    )


def _enqueued(
    record: StepRecord, bounds: HealthBounds, rejection: Mapping[str, Any] | None
) -> Verdict | None:
    budget = bounds.max_receive_count
    if rejection is not None and int(rejection["receive_count"]) >= budget:
        reason = str(rejection["reason"])
        hint = REJECTION_HINTS.get(reason.removeprefix("dead_letter_"), "")
        # Dead-lettered, not failed: a message whose envelope is valid is then confirmed by
        # the DLQ processor, and alerted, as any dead letter.
        return Verdict(
            Action.PRESUME_DEAD_LETTERED,
            f"Step {_key(record)} will never run: workers rejected its message "
            f"{rejection['receive_count']} times, its whole delivery budget of {budget}, so "
            f"it can only end in the dead-letter queue. Rejected as {reason}: "
            f"{safe_text(str(rejection['detail']), ERROR_QUOTE_CHARS)}. "
            f"{hint + ' ' if hint else ''}The ledger's dagster_taskiq_rejected_messages "
            f"table has the message (id {rejection['message_id']}).",
        )
    timeout = bounds.pickup_timeout
    if timeout and record.age_seconds > timeout:
        return Verdict(
            Action.ABANDON,
            f"Step {_key(record)} was not picked up by any worker "
            f"within {timeout} s. Are workers running and consuming {_queue(record)}?",
        )
    return _retention(record, bounds)


def _cancel_requested(record: StepRecord) -> Verdict | None:
    since = _unheld_seconds(record)
    if since is None:
        return None
    # Measured from the request too: a step queued long ago was cancelled only now.
    unheld = min(since, record.idle_seconds)
    if unheld <= CANCEL_GRACE_SECONDS:
        return None
    why = (
        "its worker stopped heartbeating"
        if record.lease_expired_seconds is not None
        else "no worker picked it up"
    )
    return Verdict(
        Action.CLOSE_CANCEL,
        f"Cancellation of step {_key(record)} was requested and "
        f"no worker has held it for {unheld:.0f} s ({why}); the executor recorded it "
        "CANCELLED.",
    )
