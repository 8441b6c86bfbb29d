"""The dead-letter processor against the real ledger and the emulator's SNS.

Alerts go to an SNS topic on the moto server with an SQS queue subscribed to it, so every
test reads back exactly what was published. The database is shared by the session: each
test uses its own run ids and message ids.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.exceptions import ClientError

from dagster_taskiq.core.errors import LedgerUnavailable
from dagster_taskiq.core.ledger import ClaimOutcome, Ledger, Status, StepRecord
from dagster_taskiq.core.messages import StepMessage, encode
from dagster_taskiq.core.sqs import sqs_client
from dagster_taskiq.dead_letters.processor import (
    DeadLetter,
    DeadLetterProcessor,
    Outcome,
    SnsAlerts,
    sns_subject,
)
from dagster_taskiq.local.endpoints import EMULATOR_CREDENTIALS, REGION

if TYPE_CHECKING:
    from mypy_boto3_sns.client import SNSClient

SIGNING_KEY = "test-signing-key"
UI_URL = "https://dagster.example.com/"
MAX_BYTES = 262_144
LEASE = 60
TTL = 3_600


@dataclass(frozen=True)
class Alert:
    subject: str
    message: str

    @property
    def fields(self) -> dict[str, Any]:
        """The machine-readable last line."""
        fields: dict[str, Any] = json.loads(self.message.rsplit("\n", 1)[-1])
        return fields


class AlertInbox:
    """An SNS topic on the emulator with an SQS queue subscribed, to read alerts back."""

    def __init__(self, endpoint: str) -> None:
        name = f"dlq-alerts-{uuid.uuid4().hex[:8]}"
        self.sns: SNSClient = boto3.client("sns", endpoint_url=endpoint, region_name=REGION)
        self.sqs = sqs_client(endpoint_url=endpoint)
        self.topic_arn = self.sns.create_topic(Name=name)["TopicArn"]
        self.queue_url = self.sqs.create_queue(QueueName=name)["QueueUrl"]
        queue_arn = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        self.sns.subscribe(TopicArn=self.topic_arn, Protocol="sqs", Endpoint=queue_arn)

    def take(self) -> list[Alert]:
        """Every alert published since the last call (moto delivers before Publish returns)."""
        alerts: list[Alert] = []
        while True:
            messages = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
            ).get("Messages", [])
            if not messages:
                return alerts
            for received in messages:
                envelope = json.loads(received["Body"])
                alerts.append(Alert(envelope.get("Subject", ""), envelope["Message"]))
                self.sqs.delete_message(
                    QueueUrl=self.queue_url, ReceiptHandle=received["ReceiptHandle"]
                )

    def missing_topic_arn(self) -> str:
        """A well-formed ARN of a topic that does not exist: every Publish fails."""
        return self.topic_arn.rsplit(":", 1)[0] + f":missing-{uuid.uuid4().hex[:8]}"


def emulator_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in EMULATOR_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


def step_message(
    *, step_key: str = "explode", attempt: int = 0, step_args: str = '{"op": "explode"}'
) -> StepMessage:
    return StepMessage.new(
        run_id=str(uuid.uuid4()),
        step_key=step_key,
        attempt=attempt,
        step_args=step_args,
        lease_seconds=LEASE,
    )


def launch(ledger: Ledger, message: StepMessage, *, signing_key: str | None = SIGNING_KEY) -> str:
    """Record the step as the executor does; returns the message body it would send."""
    assert ledger.enqueue(
        message.idempotency_key,
        run_id=message.run_id,
        step_key=message.step_key,
        attempt=message.attempt,
        payload_hash=message.payload_hash,
        ttl_seconds=TTL,
    )
    return encode(message, signing_key=signing_key, max_bytes=MAX_BYTES)


def start(ledger: Ledger, message: StepMessage, *, deliveries: int = 1) -> int:
    """Claim the step as a worker does (RUNNING); returns the fencing token."""
    claim = ledger.claim(
        message.idempotency_key,
        worker_id="worker-1",
        lease_seconds=LEASE,
        payload_hash=message.payload_hash,
        deliveries=deliveries,
    )
    assert claim.outcome is ClaimOutcome.CLAIMED
    return claim.fencing_token


def row(ledger: Ledger, message: StepMessage) -> StepRecord:
    record = ledger.get(message.idempotency_key)
    assert record is not None
    return record


def rejection(ledger: Ledger, message_id: str) -> dict[str, Any]:
    found = [dict(r) for r in ledger.rejections() if r["message_id"] == message_id]
    assert len(found) == 1, f"expected one rejection for {message_id}, got {found}"
    return found[0]


def letter(body: str, receive_count: int = 6) -> DeadLetter:
    return DeadLetter(message_id=str(uuid.uuid4()), body=body, receive_count=receive_count)


@pytest.fixture
def inbox(sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> AlertInbox:
    emulator_credentials(monkeypatch)
    return AlertInbox(sqs_endpoint)


@pytest.fixture
def processor(ledger: Ledger, inbox: AlertInbox) -> DeadLetterProcessor:
    return DeadLetterProcessor(
        ledger,
        SnsAlerts(inbox.sns, inbox.topic_arn),
        signing_key=SIGNING_KEY,
        dagster_ui_url=UI_URL,
    )


def test_running_step_is_marked_and_alerted_once(
    ledger: Ledger, inbox: AlertInbox, processor: DeadLetterProcessor
) -> None:
    message = step_message(step_key="crashes_its_worker", attempt=1)
    body = launch(ledger, message)
    start(ledger, message, deliveries=5)
    dead = letter(body, receive_count=6)

    result = processor.process(dead)

    assert result.outcome is Outcome.MARKED
    assert result.alerted
    assert (result.idempotency_key, result.run_id, result.step_key, result.attempt) == (
        message.idempotency_key,
        message.run_id,
        "crashes_its_worker",
        1,
    )
    # The workers claimed it 5 times; the DLQ's count (6) includes its own receive.
    assert result.deliveries == 5
    record = row(ledger, message)
    assert record.status is Status.DEAD_LETTERED
    assert record.deliveries == 5
    assert record.error is not None and "5 deliveries" in record.error
    assert record.lease_expires_at is None and record.finished_at is not None

    [alert] = inbox.take()
    assert "crashes_its_worker" in alert.subject and "dead-lettered" in alert.subject
    assert len(alert.subject) <= 100
    text = alert.message
    assert message.run_id in text
    assert '"crashes_its_worker"' in text
    assert "(attempt 2)" in text  # 1-based for people
    assert "after 5 deliveries" in text
    assert f"https://dagster.example.com/runs/{message.run_id}" in text
    assert alert.fields == {
        "alert": "step_dead_lettered",
        "idempotency_key": message.idempotency_key,
        "run_id": message.run_id,
        "step_key": "crashes_its_worker",
        "attempt": 1,
        "deliveries": 5,
        "message_id": dead.message_id,
        "receive_count": 6,
        "dagster_run_url": f"https://dagster.example.com/runs/{message.run_id}",
    }

    # SQS delivers the dead letter again (at-least-once): nothing new happens.
    again = processor.process(letter(body, receive_count=7))
    assert again.outcome is Outcome.ALREADY_TERMINAL
    assert not again.alerted
    assert "DEAD_LETTERED" in again.detail
    assert inbox.take() == []
    assert row(ledger, message).error == record.error


def test_reported_deliveries_are_the_ledgers_maximum(
    ledger: Ledger, inbox: AlertInbox, processor: DeadLetterProcessor
) -> None:
    message = step_message()
    body = launch(ledger, message)
    start(ledger, message, deliveries=9)

    result = processor.process(letter(body, receive_count=4))

    assert result.outcome is Outcome.MARKED
    assert result.deliveries == 9
    assert row(ledger, message).deliveries == 9
    [alert] = inbox.take()
    assert "after 9 deliveries" in alert.message
    assert alert.fields["deliveries"] == 9


def test_enqueued_step_is_marked_without_ui_link(ledger: Ledger, inbox: AlertInbox) -> None:
    message = step_message()
    body = launch(ledger, message, signing_key=None)
    processor = DeadLetterProcessor(
        ledger, SnsAlerts(inbox.sns, inbox.topic_arn), signing_key=None, dagster_ui_url=None
    )

    result = processor.process(letter(body, receive_count=3))

    assert result.outcome is Outcome.MARKED
    # No worker ever claimed it: the DLQ's count, less its own receive, is all there is.
    assert result.deliveries == 2
    assert row(ledger, message).status is Status.DEAD_LETTERED
    [alert] = inbox.take()
    assert "/runs/" not in alert.message
    assert alert.fields["dagster_run_url"] is None


def test_succeeded_step_is_left_alone(
    ledger: Ledger, inbox: AlertInbox, processor: DeadLetterProcessor
) -> None:
    # The step finished but the worker's delete was lost: the message died anyway.
    message = step_message()
    body = launch(ledger, message)
    assert ledger.complete(message.idempotency_key, start(ledger, message), succeeded=True)

    result = processor.process(letter(body))

    assert result.outcome is Outcome.ALREADY_TERMINAL
    assert not result.alerted
    assert "SUCCEEDED" in result.detail
    record = row(ledger, message)
    assert record.status is Status.SUCCEEDED
    assert record.error is None
    assert inbox.take() == []


def test_malformed_body_is_recorded_and_alerted(
    ledger: Ledger, inbox: AlertInbox, processor: DeadLetterProcessor
) -> None:
    body = '{"schema": 1, "idempotency_key": "run:step:0", "run_id": '
    dead = letter(body)

    result = processor.process(dead)

    assert result.outcome is Outcome.MALFORMED
    assert result.alerted
    assert result.run_id is None
    recorded = rejection(ledger, dead.message_id)
    assert recorded["reason"] == "dead_letter_malformed"
    assert recorded["worker_id"] == "dlq-processor"
    assert recorded["body_excerpt"] == body
    [alert] = inbox.take()
    assert alert.subject.startswith("Malformed dead letter")
    assert dead.message_id in alert.subject and dead.message_id in alert.message
    assert alert.fields["reason"] == "malformed"


def test_forged_message_never_marks_the_real_step(
    ledger: Ledger, inbox: AlertInbox, processor: DeadLetterProcessor
) -> None:
    message = step_message()
    launch(ledger, message)
    start(ledger, message)
    forged = encode(message, signing_key="someone-elses-key", max_bytes=MAX_BYTES)
    dead = letter(forged)

    result = processor.process(dead)

    assert result.outcome is Outcome.MALFORMED
    assert row(ledger, message).status is Status.RUNNING
    recorded = rejection(ledger, dead.message_id)
    assert recorded["reason"] == "dead_letter_forged"
    assert recorded["idempotency_key"] == message.idempotency_key
    [alert] = inbox.take()
    assert "(forged)" in alert.subject


def test_message_with_another_payload_never_marks_the_step(
    ledger: Ledger, inbox: AlertInbox, processor: DeadLetterProcessor
) -> None:
    launched = step_message(step_args='{"op": "launched"}')
    launch(ledger, launched)
    start(ledger, launched)
    other = StepMessage.new(
        run_id=launched.run_id,
        step_key=launched.step_key,
        attempt=launched.attempt,
        step_args='{"op": "something else"}',
        lease_seconds=LEASE,
    )
    dead = letter(encode(other, signing_key=SIGNING_KEY, max_bytes=MAX_BYTES))

    result = processor.process(dead)

    assert result.outcome is Outcome.MALFORMED
    assert row(ledger, launched).status is Status.RUNNING
    assert rejection(ledger, dead.message_id)["reason"] == "dead_letter_mismatch"
    [alert] = inbox.take()
    assert "(mismatch)" in alert.subject


def test_unknown_key_is_recorded_and_alerted(
    ledger: Ledger, inbox: AlertInbox, processor: DeadLetterProcessor
) -> None:
    message = step_message()  # never launched
    dead = letter(encode(message, signing_key=SIGNING_KEY, max_bytes=MAX_BYTES))

    result = processor.process(dead)

    assert result.outcome is Outcome.UNKNOWN_KEY
    assert result.alerted
    assert result.idempotency_key == message.idempotency_key
    assert ledger.get(message.idempotency_key) is None
    recorded = rejection(ledger, dead.message_id)
    assert recorded["reason"] == "dead_letter_unknown_key"
    assert recorded["idempotency_key"] == message.idempotency_key
    [alert] = inbox.take()
    assert message.run_id in alert.subject and message.run_id in alert.message
    assert alert.fields["alert"] == "unknown_dead_letter"


def test_unstorable_characters_are_still_recorded(
    ledger: Ledger, inbox: AlertInbox, processor: DeadLetterProcessor
) -> None:
    # JSON escapes a NUL and a lone surrogate, which a text column or the driver refuse.
    dead = letter('{"idempotency_key": "a\\u0000b\\ud800", "schema": 7}')

    result = processor.process(dead)

    assert result.outcome is Outcome.MALFORMED
    recorded = rejection(ledger, dead.message_id)
    assert recorded["reason"] == "dead_letter_unknown_version"
    assert recorded["idempotency_key"] == "a\ufffdb\ufffd"
    assert len(inbox.take()) == 1


@pytest.mark.parametrize("valid", [True, False], ids=["step", "malformed"])
def test_ledger_unreachable_raises(inbox: AlertInbox, ledger: Ledger, valid: bool) -> None:
    message = step_message()
    body = launch(ledger, message) if valid else "not json"
    down = Ledger("postgresql://postgres@127.0.0.1:1/x")
    processor = DeadLetterProcessor(
        down, SnsAlerts(inbox.sns, inbox.topic_arn), signing_key=SIGNING_KEY, dagster_ui_url=None
    )
    try:
        with pytest.raises(LedgerUnavailable):
            processor.process(letter(body))
    finally:
        down.dispose()
    assert inbox.take() == []
    if valid:
        assert row(ledger, message).status is Status.ENQUEUED


def test_failed_alert_after_the_mark_does_not_fail_the_record(
    ledger: Ledger, inbox: AlertInbox
) -> None:
    # Raising would make SQS retry a record that then finds DEAD_LETTERED and never alerts.
    message = step_message()
    body = launch(ledger, message)
    processor = DeadLetterProcessor(
        ledger,
        SnsAlerts(inbox.sns, inbox.missing_topic_arn()),
        signing_key=SIGNING_KEY,
        dagster_ui_url=UI_URL,
    )

    result = processor.process(letter(body))

    assert result.outcome is Outcome.MARKED
    assert not result.alerted
    assert "alert could not be published" in result.detail
    assert row(ledger, message).status is Status.DEAD_LETTERED


def test_failed_alert_for_a_rejection_fails_the_record(ledger: Ledger, inbox: AlertInbox) -> None:
    # Repeating a rejection is harmless, so the record is retried until it alerts.
    processor = DeadLetterProcessor(
        ledger,
        SnsAlerts(inbox.sns, inbox.missing_topic_arn()),
        signing_key=SIGNING_KEY,
        dagster_ui_url=None,
    )
    dead = letter("not json")

    with pytest.raises(ClientError):
        processor.process(dead)

    assert rejection(ledger, dead.message_id)["reason"] == "dead_letter_malformed"


def test_long_subjects_are_published(inbox: AlertInbox) -> None:
    subject = "Dagster step dead-lettered: " + "é\n" * 80
    SnsAlerts(inbox.sns, inbox.topic_arn).publish(subject, "text")

    [alert] = inbox.take()
    assert alert.subject == sns_subject(subject)
    assert len(alert.subject) == 100
    assert alert.subject.isascii() and alert.subject.isprintable()
    assert alert.subject.endswith("...")


def test_short_subjects_are_kept() -> None:
    assert sns_subject("Malformed dead letter 1234 (forged)") == (
        "Malformed dead letter 1234 (forged)"
    )
