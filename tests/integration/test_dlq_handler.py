"""The DLQ Lambda handler, invoked in-process with SQS events shaped as Lambda sends them.

Real ledger, real SNS on the emulator (alerts are read back), the real powertools
decorators; the X-Ray tracer disables itself outside Lambda.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError

from dagster_taskiq.core.errors import LedgerUnavailable
from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.core.messages import encode
from dagster_taskiq.core.settings import (
    ENV_ALERT_TOPIC_ARN,
    ENV_DAGSTER_UI_URL,
    ENV_DATABASE_URL,
    ENV_SIGNING_KEY,
)
from dagster_taskiq.dead_letters.processor import (
    SNS_MESSAGE_MAX_BYTES,
    DeadLetter,
    DeadLetterProcessor,
    DeadLetterResult,
)
from dagster_taskiq.local.endpoints import REGION
from lambdas.dlq_processor import handler
from tests.helpers import LambdaContext
from tests.integration.test_dead_letters import (
    MAX_BYTES,
    SIGNING_KEY,
    AlertInbox,
    emulator_credentials,
    launch,
    rejection,
    row,
    start,
    step_message,
)

UI_URL = "https://dagster.example.com"
DLQ_ARN = f"arn:aws:sqs:{REGION}:123456789012:dagster-taskiq-steps-dlq"


def sqs_record(body: str, *, receive_count: int = 6) -> dict[str, Any]:
    """One record as Lambda's SQS event source mapping delivers it."""
    now_ms = str(int(time.time() * 1000))
    return {
        "messageId": str(uuid.uuid4()),
        "receiptHandle": f"AQEB{uuid.uuid4().hex}{uuid.uuid4().hex}",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": str(receive_count),
            "SentTimestamp": now_ms,
            "SenderId": "AROAEXAMPLEROLEID:dagster-run-worker",
            "ApproximateFirstReceiveTimestamp": now_ms,
        },
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(body.encode(), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": DLQ_ARN,
        "awsRegion": REGION,
    }


def invoke(*records: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = handler.lambda_handler(
        {"Records": list(records)}, LambdaContext("dagster-taskiq-dlq-processor")
    )
    return response


def failed_ids(response: dict[str, Any]) -> list[str]:
    return [failure["itemIdentifier"] for failure in response["batchItemFailures"]]


def emf_metrics(stdout: str) -> dict[str, float]:
    """Every EMF metric printed, by name (the last value wins)."""
    found: dict[str, float] = {}
    for line in stdout.splitlines():
        try:
            document = json.loads(line)
        except ValueError:
            continue
        if not isinstance(document, dict) or "_aws" not in document:
            continue
        for directive in document["_aws"]["CloudWatchMetrics"]:
            for metric in directive["Metrics"]:
                value = document[metric["Name"]]
                found[metric["Name"]] = value[-1] if isinstance(value, list) else value
    return found


def unlaunched_body() -> str:
    """A valid, signed step message that no executor launched."""
    return encode(step_message(), signing_key=SIGNING_KEY, max_bytes=MAX_BYTES)


def reset_processor() -> None:
    """Forget the container's processor, as a new Lambda container would."""
    if handler.get_processor.cache_info().currsize:
        handler.get_processor().ledger.dispose()
    handler.get_processor.cache_clear()


@pytest.fixture
def inbox(
    sqs_endpoint: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AlertInbox]:
    """The Lambda's environment, alerts going to a topic the test reads back."""
    emulator_credentials(monkeypatch)
    alerts = AlertInbox(sqs_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SNS", sqs_endpoint)
    monkeypatch.setenv(ENV_DATABASE_URL, postgres_url)
    monkeypatch.setenv(ENV_ALERT_TOPIC_ARN, alerts.topic_arn)
    monkeypatch.setenv(ENV_SIGNING_KEY, SIGNING_KEY)
    monkeypatch.setenv(ENV_DAGSTER_UI_URL, UI_URL)
    for name in ("POWERTOOLS_DEV", "POWERTOOLS_METRICS_DISABLED", "LAMBDA_TASK_ROOT"):
        monkeypatch.delenv(name, raising=False)
    reset_processor()
    yield alerts
    reset_processor()


def test_batch_marks_and_alerts(
    inbox: AlertInbox,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    message = step_message(step_key="kills_worker")
    body = launch(ledger, message)
    start(ledger, message, deliveries=5)
    good = sqs_record(body, receive_count=6)
    malformed = sqs_record("{not json", receive_count=6)

    response = invoke(good, malformed)

    assert failed_ids(response) == []
    record = row(ledger, message)
    assert record.status is Status.DEAD_LETTERED
    assert record.deliveries == 5  # claimed 5 times by workers
    assert rejection(ledger, malformed["messageId"])["reason"] == "dead_letter_malformed"
    alerts = {alert.fields["alert"]: alert for alert in inbox.take()}
    assert set(alerts) == {"step_dead_lettered", "malformed_dead_letter"}
    dead = alerts["step_dead_lettered"]
    assert dead.fields["run_id"] == message.run_id
    assert dead.fields["message_id"] == good["messageId"]
    assert f"{UI_URL}/runs/{message.run_id}" in dead.message
    assert malformed["messageId"] in alerts["malformed_dead_letter"].subject

    metrics = emf_metrics(capsys.readouterr().out)
    assert metrics["StepsDeadLettered"] == 1
    assert metrics["MalformedDeadLetters"] == 1
    assert metrics["DeadLetterRecordsFailed"] == 0
    # As the Lambda prints them (the handler's stream is not the one capsys swaps in).
    formatter = handler.logger.registered_formatter
    processed = [
        json.loads(formatter.format(record))
        for record in caplog.records
        if record.getMessage() == "Dead letter processed"
    ]
    assert {(log["message_id"], log["outcome"]) for log in processed} == {
        (good["messageId"], "marked"),
        (malformed["messageId"], "malformed"),
    }
    assert all(log["function_request_id"] for log in processed)


def test_failed_record_is_reported_and_succeeds_when_retried(
    inbox: AlertInbox,
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # SNS refuses alerts (the topic is gone): a rejection's alert fails, so that record
    # must be retried; the step is marked all the same, its alert lost but logged.
    monkeypatch.setenv(ENV_ALERT_TOPIC_ARN, inbox.missing_topic_arn())
    message = step_message()
    body = launch(ledger, message)
    good = sqs_record(body)
    malformed = sqs_record("{not json")
    unknown = sqs_record(unlaunched_body())

    response = invoke(good, malformed, unknown)

    assert failed_ids(response) == [malformed["messageId"], unknown["messageId"]]
    assert row(ledger, message).status is Status.DEAD_LETTERED
    assert emf_metrics(capsys.readouterr().out)["DeadLetterRecordsFailed"] == 2

    # SNS is back; SQS delivers the failed records again, one receive later.
    monkeypatch.setenv(ENV_ALERT_TOPIC_ARN, inbox.topic_arn)
    reset_processor()
    malformed["attributes"]["ApproximateReceiveCount"] = "7"
    unknown["attributes"]["ApproximateReceiveCount"] = "7"

    assert failed_ids(invoke(malformed, unknown)) == []
    assert sorted(alert.fields["alert"] for alert in inbox.take()) == [
        "malformed_dead_letter",
        "unknown_dead_letter",
    ]
    assert rejection(ledger, malformed["messageId"])["receive_count"] == 2


def test_unreachable_ledger_fails_the_whole_batch(
    inbox: AlertInbox,
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(ENV_DATABASE_URL, "postgresql://postgres@127.0.0.1:1/x")
    message = step_message()
    body = launch(ledger, message)
    start(ledger, message)

    # Every record failed: powertools fails the invocation, and SQS retries them all.
    with pytest.raises(BatchProcessingError) as failed:
        invoke(sqs_record(body), sqs_record("{not json"))

    errors = [error for _, error, _ in failed.value.child_exceptions]
    assert len(errors) == 2
    assert all(isinstance(error, LedgerUnavailable) for error in errors)
    assert emf_metrics(capsys.readouterr().out)["DeadLetterRecordsFailed"] == 2
    assert row(ledger, message).status is Status.RUNNING
    assert inbox.take() == []


def test_one_poisoned_record_fails_alone_and_huge_keys_poison_nothing(
    inbox: AlertInbox,
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Alerts for 100,000-character step keys used to exceed SNS's limit on every try.
    message = step_message(step_key="k" * 100_000)
    huge = sqs_record(launch(ledger, message))
    start(ledger, message, deliveries=5)
    unknown = sqs_record(
        encode(step_message(step_key="u" * 100_000), signing_key=SIGNING_KEY, max_bytes=MAX_BYTES)
    )
    malformed = sqs_record("{not json")
    poisoned = sqs_record("{not json either")
    process = DeadLetterProcessor.process

    def poison(self: DeadLetterProcessor, letter: DeadLetter) -> DeadLetterResult:
        if letter.message_id == poisoned["messageId"]:
            raise RuntimeError("a record that cannot be processed")
        return process(self, letter)

    monkeypatch.setattr(DeadLetterProcessor, "process", poison)

    response = invoke(huge, poisoned, unknown, malformed)

    assert failed_ids(response) == [poisoned["messageId"]]
    assert row(ledger, message).status is Status.DEAD_LETTERED
    alerts = inbox.take()
    assert sorted(alert.fields["alert"] for alert in alerts) == [
        "malformed_dead_letter",
        "step_dead_lettered",
        "unknown_dead_letter",
    ]
    assert all(len(alert.message.encode()) <= SNS_MESSAGE_MAX_BYTES for alert in alerts)
    assert emf_metrics(capsys.readouterr().out)["DeadLetterRecordsFailed"] == 1
