"""The health check's bounds on the real ledger: each closes its row conditionally, so a
late delivery never starts the step, and the DLQ processor confirms a presumed dead
letter once, alerting on that confirmation only."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from dagster_taskiq.core.health import CANCEL_GRACE_SECONDS, VISIBILITY_MARGIN_SECONDS
from dagster_taskiq.core.ledger import ClaimOutcome, Ledger, Status, steps
from dagster_taskiq.core.messages import StepMessage
from dagster_taskiq.core.routing import QueueRoute, Routing
from dagster_taskiq.dead_letters.processor import DeadLetterProcessor, Outcome, SnsAlerts
from dagster_taskiq.executor import step_handler
from dagster_taskiq.executor.step_handler import LaunchSettings, SqsStepHandler
from tests.integration.test_dead_letters import (
    SIGNING_KEY,
    UI_URL,
    AlertInbox,
    emulator_credentials,
    launch,
    letter,
    row,
    start,
    step_message,
)

BUDGET = 3
DEAD_LETTER_TIMEOUT = 60
# Past the lease expiry of a last delivery: the visibility margin, a receive wait, and
# the time the DLQ processor is given.
GRACE = VISIBILITY_MARGIN_SECONDS + 20 + DEAD_LETTER_TIMEOUT
RETENTION = 3_600


def settings(**overrides: Any) -> LaunchSettings:
    values: dict[str, Any] = {
        "lease_seconds": 60,
        "idempotency_key_ttl": 3_600,
        "max_message_bytes": 262_144,
        "signing_key": SIGNING_KEY,
        "pickup_timeout": None,
        "max_receive_count": BUDGET,
        "message_retention": RETENTION,
        "dead_letter_timeout": DEAD_LETTER_TIMEOUT,
    }
    return LaunchSettings(**(values | overrides))


def handler(ledger: Ledger, **overrides: Any) -> SqsStepHandler:
    return SqsStepHandler(
        queues={},
        routing=Routing({"default": QueueRoute("default", "https://sqs/default")}),
        ledger=ledger,
        settings=settings(**overrides),
    )


def context(message: StepMessage) -> Any:
    """What the health check reads of Dagster's step handler context."""
    args = SimpleNamespace(
        run_id=message.run_id, step_keys_to_execute=[message.step_key], known_state=None
    )
    return SimpleNamespace(execute_step_args=args, instance=None)


def health(ledger: Ledger, message: StepMessage, **overrides: Any) -> str | None:
    """The unhealthy reason, or None when healthy (a fresh handler: no snapshot)."""
    result = handler(ledger, **overrides).check_step_health(context(message))
    return None if result.is_healthy else result.unhealthy_reason


def age(ledger: Ledger, message: StepMessage, **seconds_ago: float) -> None:
    """Move the row's times into the past, by the database clock."""
    values = {
        column: sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, float(seconds))
        for column, seconds in seconds_ago.items()
    }
    with ledger.transaction() as conn:
        conn.execute(
            sa.update(steps)
            .where(steps.c.idempotency_key == message.idempotency_key)
            .values(values)
        )


def late_claim(ledger: Ledger, message: StepMessage) -> ClaimOutcome:
    return ledger.claim(
        message.idempotency_key,
        worker_id="late-worker",
        lease_seconds=60,
        payload_hash=message.payload_hash,
        deliveries=BUDGET + 1,
    ).outcome


@pytest.fixture
def alerts_inbox(sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> AlertInbox:
    emulator_credentials(monkeypatch)
    return AlertInbox(sqs_endpoint)


@pytest.fixture
def dlq_processor(ledger: Ledger, alerts_inbox: AlertInbox) -> DeadLetterProcessor:
    return DeadLetterProcessor(
        ledger,
        SnsAlerts(alerts_inbox.sns, alerts_inbox.topic_arn),
        signing_key=SIGNING_KEY,
        dagster_ui_url=UI_URL,
    )


# -- a last delivery whose worker died -----------------------------------------------------


def test_a_last_delivery_whose_worker_died_is_presumed_dead_lettered(ledger: Ledger) -> None:
    message = step_message(step_key="kills_its_worker")
    launch(ledger, message)
    token = start(ledger, message, deliveries=BUDGET)
    assert ledger.release(message.idempotency_key, token, "step process died: exit 17")
    age(ledger, message, lease_expires_at=GRACE - 5)
    assert health(ledger, message) is None, "within the grace"

    age(ledger, message, lease_expires_at=GRACE + 5)
    reason = health(ledger, message)

    assert reason is not None
    assert f"used its last of {BUDGET} deliveries" in reason
    assert "its message is in the dead-letter queue" in reason
    assert "check the DLQ processor function, its errors and its event source" in reason
    assert "step process died: exit 17" in reason
    record = row(ledger, message)
    assert record.status is Status.DEAD_LETTERED and record.presumed_dead_letter
    assert record.finished_at is not None
    # A delivery that comes all the same never starts it.
    assert late_claim(ledger, message) is ClaimOutcome.DUPLICATE
    # Later rounds (or a resumed run) say the same.
    assert health(ledger, message) == reason


def test_a_takeover_or_a_delivery_left_is_never_presumed(ledger: Ledger) -> None:
    message = step_message()
    launch(ledger, message)
    token = start(ledger, message, deliveries=BUDGET - 1)
    age(ledger, message, lease_expires_at=10 * GRACE)
    assert health(ledger, message) is None, "one delivery left: it may come"

    # The last delivery takes the step over: the old token can close nothing.
    taken = ledger.claim(
        message.idempotency_key,
        worker_id="worker-2",
        lease_seconds=60,
        payload_hash=message.payload_hash,
        deliveries=BUDGET,
    )
    assert taken.outcome is ClaimOutcome.CLAIMED
    assert not ledger.presume_dead_lettered(message.idempotency_key, token, "stale")
    # A live lease is never presumed, whatever the count.
    assert not ledger.presume_dead_lettered(message.idempotency_key, taken.fencing_token, "x")
    assert health(ledger, message) is None
    assert row(ledger, message).status is Status.RUNNING


def test_the_dlq_processor_confirms_a_presumed_step_and_alerts_once(
    ledger: Ledger, alerts_inbox: AlertInbox, dlq_processor: DeadLetterProcessor
) -> None:
    message = step_message(step_key="kills_its_worker")
    body = launch(ledger, message)
    start(ledger, message, deliveries=BUDGET)
    age(ledger, message, lease_expires_at=GRACE + 5)
    assert health(ledger, message) is not None
    assert alerts_inbox.take() == [], "the executor does not page"

    result = dlq_processor.process(letter(body, receive_count=BUDGET + 1))

    assert result.outcome is Outcome.CONFIRMED
    assert result.alerted and result.deliveries == BUDGET
    [alert] = alerts_inbox.take()
    assert "kills_its_worker" in alert.subject
    assert alert.fields["alert"] == "step_dead_lettered"
    assert alert.fields["presumed_by_executor"] is True
    assert "The executor had already failed the step" in alert.message
    record = row(ledger, message)
    assert record.status is Status.DEAD_LETTERED and not record.presumed_dead_letter
    assert record.error is not None and f"after {BUDGET} deliveries" in record.error
    reason = health(ledger, message)
    assert reason is not None and f"dead-lettered after {BUDGET} deliveries" in reason

    # SQS delivers the letter again: the confirmation happened once, and so did the alert.
    again = dlq_processor.process(letter(body, receive_count=BUDGET + 2))
    assert again.outcome is Outcome.ALREADY_TERMINAL and not again.alerted
    assert alerts_inbox.take() == []


def test_a_step_the_dlq_processor_marked_first_is_alerted_as_before(
    ledger: Ledger, alerts_inbox: AlertInbox, dlq_processor: DeadLetterProcessor
) -> None:
    message = step_message()
    body = launch(ledger, message)
    start(ledger, message, deliveries=BUDGET)

    assert dlq_processor.process(letter(body)).outcome is Outcome.MARKED
    [alert] = alerts_inbox.take()
    assert "presumed_by_executor" not in alert.fields
    # The executor never presumes over it.
    age(ledger, message, lease_expires_at=GRACE + 5)
    reason = health(ledger, message)
    assert reason is not None and "was dead-lettered after" in reason
    assert not row(ledger, message).presumed_dead_letter


# -- deliveries left, a queued step --------------------------------------------------------


def test_a_step_given_back_and_not_taken_again_fails_after_the_pickup_timeout(
    ledger: Ledger,
) -> None:
    message = step_message()
    launch(ledger, message)
    start(ledger, message, deliveries=1)
    age(ledger, message, enqueued_at=1_000, lease_expires_at=30)
    assert health(ledger, message, pickup_timeout=30) is None

    age(ledger, message, lease_expires_at=30 + VISIBILITY_MARGIN_SECONDS + 5)
    reason = health(ledger, message, pickup_timeout=30)

    assert reason is not None and "within the pick-up timeout of 30 s" in reason
    assert row(ledger, message).status is Status.FAILED
    assert late_claim(ledger, message) is ClaimOutcome.DUPLICATE


@pytest.mark.parametrize("claimed", [False, True], ids=["queued", "given_back"])
def test_a_step_whose_message_outlived_the_retention_fails(ledger: Ledger, claimed: bool) -> None:
    message = step_message()
    launch(ledger, message)
    if claimed:
        start(ledger, message, deliveries=1)
        age(ledger, message, lease_expires_at=RETENTION)
    age(ledger, message, enqueued_at=RETENTION)
    assert health(ledger, message) is None

    age(ledger, message, enqueued_at=RETENTION + 60)
    reason = health(ledger, message)

    assert reason is not None and f"message retention of {RETENTION} s" in reason
    assert row(ledger, message).status is Status.FAILED


@pytest.mark.parametrize("long_key", [False, True], ids=["key", "long_key"])
def test_a_message_every_worker_rejected_fails_its_step_with_the_reason(
    ledger: Ledger, long_key: bool
) -> None:
    # The executor signs with a key the workers do not have.
    message = step_message(step_key="s" * 5_000 if long_key else "signed_elsewhere")
    launch(ledger, message)
    mismatch = {"message_id": "other", "reason": "mismatch", "detail": "another payload"}
    for _ in range(BUDGET):
        # A message that is not this step's (another payload) never counts.
        ledger.record_rejection(
            **mismatch, body="{}", worker_id="w", idempotency_key=message.idempotency_key
        )
    assert health(ledger, message) is None
    rejected = f"forged-{message.run_id}"
    for delivery in range(BUDGET):
        ledger.record_rejection(
            message_id=rejected,
            reason="forged",
            detail="the signature does not verify",
            body="{}",
            worker_id=f"worker-{delivery}",
            idempotency_key=message.idempotency_key,
        )
        if delivery < BUDGET - 1:
            assert health(ledger, message) is None

    reason = health(ledger, message)

    assert reason is not None
    assert f"workers rejected its message {BUDGET} times" in reason
    assert "forged" in reason and "same signing key" in reason and rejected in reason
    record = row(ledger, message)
    assert record.status is Status.DEAD_LETTERED and record.presumed_dead_letter
    assert late_claim(ledger, message) is ClaimOutcome.DUPLICATE


def test_a_round_reads_the_rejections_of_a_run_once(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = step_message(step_key="a")
    messages = [first] + [
        StepMessage.new(
            run_id=first.run_id, step_key=k, attempt=0, step_args="{}", lease_seconds=60
        )
        for k in ("b", "c", "d")
    ]
    for message in messages:
        launch(ledger, message)
    reads: list[list[str]] = []
    rejections_of = ledger.rejections_of

    def counted(keys: list[str]) -> dict[str, Any]:
        reads.append(keys)
        return rejections_of(keys)

    monkeypatch.setattr(ledger, "rejections_of", counted)
    one = handler(ledger)

    for message in messages:
        assert one.check_step_health(context(message)).is_healthy

    assert len(reads) == 1
    assert sorted(reads[0]) == sorted(m.idempotency_key for m in messages)
    assert rejections_of([first.idempotency_key]) == {}


# -- cancellation ---------------------------------------------------------------------------


@pytest.mark.parametrize("claimed", [False, True], ids=["queued", "worker_died"])
def test_a_cancel_no_worker_finishes_is_closed(ledger: Ledger, claimed: bool) -> None:
    message = step_message()
    launch(ledger, message)
    if claimed:
        start(ledger, message, deliveries=1)
    assert ledger.request_cancel(message.idempotency_key) is not None
    if claimed:
        # Live: its worker interrupts the step and finishes the cancel itself.
        age(ledger, message, updated_at=10 * CANCEL_GRACE_SECONDS)
        assert health(ledger, message) is None
        age(ledger, message, lease_expires_at=CANCEL_GRACE_SECONDS + 5)
    else:
        age(ledger, message, updated_at=CANCEL_GRACE_SECONDS - 5)
        assert health(ledger, message) is None
        age(ledger, message, updated_at=CANCEL_GRACE_SECONDS + 5)

    reason = health(ledger, message)

    assert reason is not None and "the executor recorded it CANCELLED" in reason
    assert row(ledger, message).status is Status.CANCELLED
    assert late_claim(ledger, message) is ClaimOutcome.DUPLICATE


def test_a_cancelled_step_without_an_ending_is_not_healthy_for_ever(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A resumed run finds the step cancelled by a worker before it started: no ending in
    # the event log will ever come.
    message = step_message()
    launch(ledger, message)
    ledger.request_cancel(message.idempotency_key)
    assert late_claim(ledger, message) is ClaimOutcome.CANCELLED
    ending: list[object] = []
    monkeypatch.setattr(
        step_handler, "attempt_outcome", lambda *args: ending[0] if ending else None
    )
    # The round's read of the run's endings (none), then the step's own read above.
    monkeypatch.setattr(step_handler, "run_endings", lambda *args: {})

    reason = health(ledger, message)

    assert reason is not None and f"Step {message.step_key} was cancelled" in reason
    ending.append(object())  # the step's ending is in the event log
    assert health(ledger, message) is None


def test_a_rejected_step_presumed_dead_lettered_is_still_alerted_by_the_dlq_processor(
    ledger: Ledger, alerts_inbox: AlertInbox, dlq_processor: DeadLetterProcessor
) -> None:
    # Workers could not read its step arguments; its envelope is valid, so the DLQ
    # processor knows the step when the letter comes, after the executor gave up.
    message = step_message()
    body = launch(ledger, message)
    for _ in range(BUDGET):
        ledger.record_rejection(
            message_id=f"unreadable-{message.run_id}",
            reason="malformed",
            detail="the step arguments do not deserialize",
            body=body,
            worker_id="worker-1",
            idempotency_key=message.idempotency_key,
        )
    reason = health(ledger, message)
    assert reason is not None and "the step arguments do not deserialize" in reason

    result = dlq_processor.process(letter(body, receive_count=BUDGET + 1))

    assert result.outcome is Outcome.CONFIRMED and result.alerted
    [alert] = alerts_inbox.take()
    assert alert.fields["presumed_by_executor"] is True
