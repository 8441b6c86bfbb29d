"""The worker's decisions, over their whole input space.

Each table below is the protocol (docs/protocol.md, the README's guarantees) written out
by hand: what a worker does with a message for every combination of what it found. The
tests walk every combination (every enum value, representative strings, and Hypothesis
where the input is a number) and compare the decision with the table. The last part runs
a real ``Worker`` on fakes and checks that it carries each decision out.
"""

from __future__ import annotations

import ast
import enum
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dagster_taskiq.core.errors import LedgerUnavailable
from dagster_taskiq.core.ledger import Claim, ClaimOutcome, Status
from dagster_taskiq.core.messages import RejectReason, StepMessage, encode
from dagster_taskiq.core.sqs import ReceivedMessage
from dagster_taskiq.worker import decisions
from dagster_taskiq.worker.config import STEP_PROCESS_SPAWN, WorkerSettings
from dagster_taskiq.worker.decisions import (
    LEDGER_UNREACHABLE,
    Check,
    ClaimStep,
    ClaimUnder,
    Complete,
    Delete,
    DeleteReason,
    FinishCancel,
    HandOver,
    Hide,
    HideForClaim,
    HideReason,
    Leave,
    LeaveReason,
    MessageCheck,
    Reject,
    Release,
    Run,
    Unreachable,
    after_check,
    after_claim,
    after_fenced_write,
    after_step,
    claim_visibility,
    on_receipt,
)
from dagster_taskiq.worker.heartbeat import VISIBILITY_MARGIN, LeaseState, lease_within
from dagster_taskiq.worker.step_process import StepProcessDied
from dagster_taskiq.worker.supervisor import Worker
from dagster_taskiq.worker.tasks import Outcome, StepResult, Vetting

REFUSAL = "the job's code is not one of this worker's locations"
DETAILS = (None, "boom", "")  # a result's detail: none, some text, empty text
FAILURES = (None, "step process died: exit code -9", "worker error: pipe closed")


# -- receipt ---------------------------------------------------------------------------------


def test_a_stopping_worker_gives_every_message_back_at_once() -> None:
    assert on_receipt(stopping=False) == HandOver()
    assert on_receipt(stopping=True) == Hide(0, HideReason.WORKER_STOPPING)


# -- decoded and vetted, before any claim ------------------------------------------------------

CHECKS = {
    Check.UNDECODABLE: MessageCheck.undecodable("forged", "the signature does not match"),
    Check.UNREAD: MessageCheck.unread("step process died"),
    Check.MALFORMED: MessageCheck.vetted(Vetting(malformed="the arguments are for run-b")),
    Check.REFUSED: MessageCheck.vetted(Vetting(refusal=REFUSAL)),
    Check.ACCEPTED: MessageCheck.vetted(Vetting()),
}

AFTER_CHECK = {
    # Never executed: recorded, and left to SQS until it dead-letters.
    Check.UNDECODABLE: Reject("forged", "the signature does not match"),
    # Nothing here could read it: back to the queue after a breath.
    Check.UNREAD: Hide(5, HideReason.STEP_PROCESS_GONE),
    Check.MALFORMED: Reject("malformed", "the arguments are for run-b"),
    # A refused step is claimed, so that its failure is recorded once (after_claim).
    Check.REFUSED: ClaimStep(),
    Check.ACCEPTED: ClaimStep(),
}


def test_every_check_has_a_row() -> None:
    assert set(AFTER_CHECK) == set(Check) == set(CHECKS)
    assert {c.outcome for c in CHECKS.values()} == set(Check)


@pytest.mark.parametrize("outcome", list(Check))
def test_what_is_done_before_the_claim(outcome: Check) -> None:
    assert after_check(CHECKS[outcome]) == AFTER_CHECK[outcome]


@pytest.mark.parametrize("reason", get_args(RejectReason))
def test_every_reason_decode_gives_is_the_rejections(reason: str) -> None:
    assert after_check(MessageCheck.undecodable(reason, "why")) == Reject(reason, "why")


def test_vetting_maps_to_a_check() -> None:
    assert MessageCheck.vetted(Vetting()).outcome is Check.ACCEPTED
    assert MessageCheck.vetted(Vetting(refusal=REFUSAL)).refusal == REFUSAL
    # Malformed arguments are never executed, whatever else the vetting says.
    both = MessageCheck.vetted(Vetting(malformed="bad", refusal=REFUSAL))
    assert both.outcome is Check.MALFORMED and both.refusal is None
    assert [c.refusal for c in CHECKS.values()] == [None, None, None, REFUSAL, None]


# -- the claim's visibility ---------------------------------------------------------------------

NOW = 1000.0

# (seconds until the message may be seen again, the step's lease) -> how the claim is made
CLAIM_VISIBILITY: list[tuple[float, int, ClaimUnder | HideForClaim]] = [
    # The receive's 15 s leave a 13 s lease: claimed under them, the heartbeat extends.
    (15.0, 300, ClaimUnder(NOW + 15.0)),
    (5.0, 300, ClaimUnder(NOW + 5.0)),  # a 3 s lease: just enough
    (4.9, 300, HideForClaim(302, NOW + 302)),  # less: hidden for the lease and the margin
    (-1.0, 300, HideForClaim(302, NOW + 302)),  # visible already
    (-NOW, 300, HideForClaim(302, NOW + 302)),  # 0: a receive of unknown visibility
    (4.0, 2, ClaimUnder(NOW + 4.0)),  # a lease shorter than 3 s, granted whole
    (3.9, 2, HideForClaim(4, NOW + 4)),
    (15.0, 1, ClaimUnder(NOW + 15.0)),
    (2.5, 1, HideForClaim(3, NOW + 3)),
]


@pytest.mark.parametrize(("hidden_for", "lease", "expected"), CLAIM_VISIBILITY)
def test_how_a_claim_is_kept_within_the_visibility(
    hidden_for: float, lease: int, expected: ClaimUnder | HideForClaim
) -> None:
    assert claim_visibility(NOW + hidden_for, lease, NOW) == expected


@given(
    hidden_for=st.floats(-2_000, 50_000, allow_nan=False),
    lease=st.integers(1, 43_000),
    now=st.floats(0, 10_000_000, allow_nan=False),
)
def test_a_claim_gets_a_useful_lease_that_ends_before_the_message_shows(
    hidden_for: float, lease: int, now: float
) -> None:
    received_hidden_until = now + hidden_for
    useful = min(3.0, lease)
    match claim_visibility(received_hidden_until, lease, now):
        case ClaimUnder(hidden_until=hidden_until):
            assert hidden_until == received_hidden_until, "the receive's own visibility"
            assert lease_within(hidden_until, lease, now) >= useful
        case HideForClaim(seconds=seconds, hidden_until=hidden_until):
            assert lease_within(received_hidden_until, lease, now) < useful
            assert isinstance(seconds, int), "SQS takes whole seconds"
            assert lease + VISIBILITY_MARGIN <= seconds < lease + VISIBILITY_MARGIN + 1
            assert hidden_until == now + seconds
            # The whole lease, but for a rounding far below a millisecond on a large clock.
            assert lease_within(hidden_until, lease, now) == pytest.approx(lease, abs=1e-6)


# -- the ledger's answer to the claim ------------------------------------------------------------

UNREACHABLE = "unreachable"  # a row label; the input is decisions.LEDGER_UNREACHABLE
REMAINING = 120.4  # what the ledger says is left of a live lease elsewhere (BUSY)

# (the claim's outcome, refused by vetting) -> what is done
AFTER_CLAIM: dict[tuple[ClaimOutcome | str, bool], object] = {
    (ClaimOutcome.CLAIMED, False): Run(),
    # The token is ours, the code is not: its failure is recorded, then the message deleted.
    (ClaimOutcome.CLAIMED, True): Complete(succeeded=False, error=REFUSAL, duplicate=False),
    # Already terminal: a duplicate delivery, never run twice.
    (ClaimOutcome.DUPLICATE, False): Delete(DeleteReason.DUPLICATE),
    (ClaimOutcome.DUPLICATE, True): Delete(DeleteReason.DUPLICATE),
    # Cancel requested before it started: it must never run.
    (ClaimOutcome.CANCELLED, False): Delete(DeleteReason.CANCELLED),
    (ClaimOutcome.CANCELLED, True): Delete(DeleteReason.CANCELLED),
    # A live lease elsewhere: look again just after it would run out.
    (ClaimOutcome.BUSY, False): Hide(121, HideReason.HELD_ELSEWHERE),
    (ClaimOutcome.BUSY, True): Hide(121, HideReason.HELD_ELSEWHERE),
    # No ledger row, or another payload under this key: never executed, left to the DLQ.
    (ClaimOutcome.UNKNOWN, False): Reject(
        "unknown_key", "no ledger record for this idempotency key"
    ),
    (ClaimOutcome.UNKNOWN, True): Reject(
        "unknown_key", "no ledger record for this idempotency key"
    ),
    (ClaimOutcome.MISMATCH, False): Reject("mismatch", "the payload differs from the one launched"),
    (ClaimOutcome.MISMATCH, True): Reject("mismatch", "the payload differs from the one launched"),
    # No answer: the message stays queued, back in 10 s; the slot waits 5 s.
    (UNREACHABLE, False): Hide(10, HideReason.LEDGER_UNREACHABLE, pause_seconds=5.0),
    (UNREACHABLE, True): Hide(10, HideReason.LEDGER_UNREACHABLE, pause_seconds=5.0),
}
CLAIM_ANSWERS: list[ClaimOutcome | str] = [*ClaimOutcome, UNREACHABLE]


def _claim(answer: ClaimOutcome | str, remaining: float = REMAINING) -> Claim | Unreachable:
    if answer == UNREACHABLE:
        return LEDGER_UNREACHABLE
    assert isinstance(answer, ClaimOutcome)
    return Claim(answer, fencing_token=7, previous_worker="w-0", lease_remaining_seconds=remaining)


def test_every_claim_answer_has_a_row() -> None:
    assert set(AFTER_CLAIM) == set(itertools.product(CLAIM_ANSWERS, (False, True)))


@pytest.mark.parametrize(
    ("answer", "refused"), list(itertools.product(CLAIM_ANSWERS, (False, True)))
)
def test_what_is_done_after_the_claim(answer: ClaimOutcome | str, refused: bool) -> None:
    refusal = REFUSAL if refused else None
    assert after_claim(_claim(answer), refusal=refusal) == AFTER_CLAIM[answer, refused]


@given(
    remaining=st.floats(0, 43_200, allow_nan=False),
    token=st.integers(0, 2**31),
    takeover=st.booleans(),
)
def test_a_busy_step_is_looked_at_again_just_after_its_lease(
    remaining: float, token: int, takeover: bool
) -> None:
    for outcome in ClaimOutcome:
        claim = Claim(
            outcome,
            fencing_token=token,
            previous_status=Status.RUNNING if takeover else Status.ENQUEUED,
            lease_remaining_seconds=remaining,
        )
        action = after_claim(claim, refusal=None)
        if outcome is ClaimOutcome.BUSY:
            assert isinstance(action, Hide) and action.reason is HideReason.HELD_ELSEWHERE
            assert isinstance(action.seconds, int) and action.pause_seconds == 0
            assert remaining < action.seconds <= remaining + 1
        else:  # nothing else about the claim matters
            assert action == AFTER_CLAIM[outcome, False]


# -- the step's ending -------------------------------------------------------------------------


class Do(enum.Enum):
    """The kinds of action a step's ending leads to; ``_expected`` fills in their values."""

    LEAVE = "leave"  # lease lost: record nothing, delete nothing
    RELEASE_NOW = "release_now"  # shutting down: to another worker at once
    GIVE_BACK = "give_back"  # no result: released, hidden for a breath
    GIVE_BACK_NO_ENDING = "give_back_no_ending"  # the step could not write its ending
    CANCEL = "cancel"  # interrupted, or its run is finished or cancelling
    COMPLETE = "complete"
    COMPLETE_DUPLICATE = "complete_duplicate"  # the ending was in the event log already


# Columns: what the step process answered.
RESULTS: tuple[Outcome | None, ...] = (
    None,
    Outcome.SUCCEEDED,
    Outcome.FAILED,
    Outcome.ALREADY_ENDED,
    Outcome.INTERRUPTED,
    Outcome.NOT_STARTED,
    Outcome.NO_ENDING,
)
_OURS = (
    Do.GIVE_BACK,
    Do.COMPLETE,
    Do.COMPLETE,
    Do.COMPLETE_DUPLICATE,
    Do.CANCEL,
    Do.CANCEL,
    Do.GIVE_BACK_NO_ENDING,
)
AFTER_STEP: dict[LeaseState, tuple[Do, ...]] = {
    LeaseState.HELD: _OURS,
    # Still fenced by our token: the ledger decides what the write does (docs/protocol.md).
    LeaseState.CANCEL_REQUESTED: _OURS,
    LeaseState.LOST: (Do.LEAVE,) * len(RESULTS),
    LeaseState.RELEASING: (Do.RELEASE_NOW,) * len(RESULTS),
}


def _expected(do: Do, result: StepResult | None, failure: str | None) -> object:
    detail = result.detail if result is not None else None
    succeeded = result is not None and result.succeeded
    error = None if succeeded else detail
    return {
        Do.LEAVE: Leave(LeaveReason.LEASE_LOST),
        Do.RELEASE_NOW: Release("released: worker shutting down", 0),
        Do.GIVE_BACK: Release(failure or "no result from the step process", 5),
        Do.GIVE_BACK_NO_ENDING: Release(
            f"given back: the step could not record its ending: {detail}", 5
        ),
        Do.CANCEL: FinishCancel(detail),
        Do.COMPLETE: Complete(succeeded=succeeded, error=error, duplicate=False),
        Do.COMPLETE_DUPLICATE: Complete(succeeded=succeeded, error=error, duplicate=True),
    }[do]


def _results(outcome: Outcome | None) -> list[StepResult | None]:
    if outcome is None:
        return [None]
    return [
        StepResult("run:step:0", outcome, succeeded, detail, 1.5)
        for succeeded, detail in itertools.product((True, False), DETAILS)
    ]


def test_every_lease_state_and_result_has_a_cell() -> None:
    assert set(RESULTS) == {None, *Outcome} and len(RESULTS) == len(Outcome) + 1
    assert set(AFTER_STEP) == set(LeaseState)
    assert all(len(row) == len(RESULTS) for row in AFTER_STEP.values())


@pytest.mark.parametrize(("lease", "column"), list(itertools.product(LeaseState, range(7))))
def test_what_is_done_with_a_steps_ending(lease: LeaseState, column: int) -> None:
    do = AFTER_STEP[lease][column]
    for result, failure in itertools.product(_results(RESULTS[column]), FAILURES):
        assert after_step(lease, result, failure) == _expected(do, result, failure), (
            lease,
            result,
            failure,
        )


def test_no_ending_is_recorded_without_the_lease() -> None:
    # Said once more without the table: a lost lease writes nothing and deletes nothing,
    # and only the token's holder (HELD, CANCEL_REQUESTED) records an ending.
    for lease, outcome in itertools.product(LeaseState, RESULTS):
        for result in _results(outcome):
            action = after_step(lease, result, None)
            if lease is LeaseState.LOST:
                assert action == Leave(LeaveReason.LEASE_LOST)
            if isinstance(action, Complete | FinishCancel):
                assert lease in (LeaseState.HELD, LeaseState.CANCEL_REQUESTED)
                assert result is not None


# -- deleting after a fenced write ------------------------------------------------------------


def test_a_message_is_deleted_only_once_its_ending_is_recorded() -> None:
    assert after_fenced_write(updated=True) == Delete(DeleteReason.ENDED)
    assert after_fenced_write(updated=False) == Leave(LeaveReason.NOT_HELD)


def test_the_decisions_read_no_clock_and_do_no_io() -> None:
    tree = ast.parse(Path(decisions.__file__).read_text())
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {
        "__future__",
        "enum",
        "math",
        "dataclasses",
        "typing",
        "dagster_taskiq.core.ledger",  # the claim's outcomes
        "dagster_taskiq.worker.heartbeat",  # the lease's states, and lease_within
        "dagster_taskiq.worker.tasks",  # the step process's answers
    }


# -- the supervisor carries the decisions out ---------------------------------------------------


@dataclass
class Calls:
    """The queue and the ledger at once: what the worker asked of them, in order."""

    answer: Claim | None = None  # the claim's; None: the ledger is unreachable
    completed: bool = True
    log: list[tuple[Any, ...]] = field(default_factory=list)

    def change_visibility(self, receipt_handle: str, seconds: int) -> None:
        self.log.append(("hide", seconds))

    def delete(self, receipt_handle: str) -> None:
        self.log.append(("delete",))

    def claim(self, key: str, **_: object) -> Claim:
        if self.answer is None:
            raise LedgerUnavailable("connection refused")
        self.log.append(("claim",))
        return self.answer

    def complete(self, key: str, token: int, **ending: object) -> bool:
        self.log.append(("complete", token, ending))
        return self.completed

    def record_rejection(self, **record: object) -> None:
        self.log.append(("reject", record["reason"]))


class VettingProcess:
    def __init__(self, vetting: Vetting | None) -> None:
        self.vetting = vetting  # None: the process died

    def vet(self, message: StepMessage) -> Vetting:
        if self.vetting is None:
            raise StepProcessDied(-9)
        return self.vetting


@dataclass
class FakeSlot:
    process: VettingProcess


def _handle(calls: Calls, vetting: Vetting | None) -> None:
    settings = WorkerSettings(
        queue_urls=("q",),
        database_url="",
        code_locations=(),
        step_process_start=STEP_PROCESS_SPAWN,
        worker_id="worker-1",
    )
    queue_and_ledger: Any = calls
    worker = Worker(settings, queues={"q": queue_and_ledger}, ledger=queue_and_ledger)
    worker.stopping.set()  # no pause after an unreachable ledger: this slot is not reused
    message = StepMessage.new("run", "step", 0, "args", lease_seconds=60)
    body = encode(message, signing_key=None, max_bytes=256 * 1024)
    # Hidden for long enough that the claim needs no change of visibility.
    received = ReceivedMessage("m-1", "r-1", body, 1, 0, "q", hidden_until=time.monotonic() + 15)
    slot: Any = FakeSlot(VettingProcess(vetting))
    worker.handle(slot, received)


CARRIED_OUT: dict[str, tuple[Vetting | None, Claim | None, list[tuple[Any, ...]]]] = {
    "unread": (None, None, [("hide", 5)]),
    "malformed": (
        Vetting(malformed="not this step's"),
        None,
        [("reject", "malformed"), ("hide", 0)],
    ),
    "duplicate": (Vetting(), Claim(ClaimOutcome.DUPLICATE), [("claim",), ("delete",)]),
    "cancelled": (Vetting(), Claim(ClaimOutcome.CANCELLED), [("claim",), ("delete",)]),
    "busy": (
        Vetting(),
        Claim(ClaimOutcome.BUSY, lease_remaining_seconds=REMAINING),
        [("claim",), ("hide", 121)],
    ),
    "unknown": (
        Vetting(),
        Claim(ClaimOutcome.UNKNOWN),
        [("claim",), ("reject", "unknown_key"), ("hide", 0)],
    ),
    "mismatch": (
        Vetting(),
        Claim(ClaimOutcome.MISMATCH),
        [("claim",), ("reject", "mismatch"), ("hide", 0)],
    ),
    "refused": (
        Vetting(refusal=REFUSAL),
        Claim(ClaimOutcome.CLAIMED, fencing_token=7),
        [
            ("claim",),
            ("complete", 7, {"succeeded": False, "error": REFUSAL, "duplicate": False}),
            ("delete",),
        ],
    ),
    "unreachable": (Vetting(), None, [("hide", 10)]),
}


@pytest.mark.parametrize("case", list(CARRIED_OUT))
def test_the_worker_carries_out_what_was_decided(case: str) -> None:
    vetting, answer, expected = CARRIED_OUT[case]
    calls = Calls(answer=answer)
    _handle(calls, vetting)
    assert calls.log == expected


def test_a_refused_step_whose_completion_is_not_recorded_keeps_its_message() -> None:
    calls = Calls(answer=Claim(ClaimOutcome.CLAIMED, fencing_token=3), completed=False)
    _handle(calls, Vetting(refusal=REFUSAL))
    assert [c[0] for c in calls.log] == ["claim", "complete"], "no delete without the row"
