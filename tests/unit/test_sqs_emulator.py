"""The emulator's changes to moto's SQS give the answers moto's own code gives."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import boto3
import pytest
from moto import backends, mock_aws
from moto.sqs import models

from dagster_taskiq.local.sqs_emulator import speed_up_moto

if TYPE_CHECKING:
    from mypy_boto3_sqs.type_defs import SendMessageBatchRequestEntryTypeDef

REPLACED = [
    "unix_time",
    "unix_time_millis",
    "is_message_valid_based_on_retention_period",
    "list_of_moto_modules",
    "send_message",
    "send_message_batch",
    "attributes",
    "delete_message",
    "receive_message",
]
OWNERS = [
    models,
    models,
    models.SQSBackend,
    backends,
    models.SQSBackend,
    models.SQSBackend,
    models.Queue,
    models.Queue,
    models.SQSBackend,
]


@pytest.fixture
def sped_up(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # monkeypatch puts moto's own back when the test ends.
    for owner, name in zip(OWNERS, REPLACED, strict=True):
        monkeypatch.setattr(
            owner, name, vars(owner)[name] if name == "attributes" else getattr(owner, name)
        )
    assert speed_up_moto() == REPLACED, "moto moved a name the emulator replaces"
    with mock_aws():
        yield


def test_the_clock_is_moto_s(sped_up: None) -> None:
    from moto.core.utils import unix_time, utcfromtimestamp

    clock, clock_millis = getattr(models, "unix_time"), getattr(models, "unix_time_millis")  # noqa: B009
    assert clock is not unix_time
    assert abs(clock() - unix_time()) < 0.5
    assert clock_millis() == pytest.approx(time.time() * 1000, abs=500)
    moment = utcfromtimestamp(1_700_000_000)
    assert clock(moment) == unix_time(moment) == 1_700_000_000.0


def test_visibility_and_retention_as_sqs_keeps_them(sped_up: None) -> None:
    sqs = boto3.client("sqs", region_name="us-east-1")
    url = sqs.create_queue(QueueName="steps", Attributes={"MessageRetentionPeriod": "60"})[
        "QueueUrl"
    ]
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")

    first = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=30)
    assert [m["Body"] for m in first["Messages"]] == ["m0"]
    rest = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert sorted(m["Body"] for m in rest) == ["m1", "m2"], "a hidden message stays hidden"
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "3"

    # A message older than the retention period is gone, as in SQS.
    backend = models.sqs_backends["123456789012"]["us-east-1"]
    queue = backend.get_queue("steps")
    sqs.send_message(QueueUrl=url, MessageBody="old")
    old = next(m for m in queue._messages if m.body == "old")
    old.sent_timestamp = int(time.time() * 1000) - 61_000  # type: ignore[assignment]
    assert sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages") is None


LISTED_BY_MOTO = list(backends.list_of_moto_modules())


def test_the_services_are_moto_s(sped_up: None) -> None:
    assert backends.list_of_moto_modules() == tuple(LISTED_BY_MOTO)
    assert "sqs" in backends.list_of_moto_modules()


def test_sends_deduplicate_and_count_as_moto_does(sped_up: None) -> None:
    sqs = boto3.client("sqs", region_name="us-east-1")
    fifo = sqs.create_queue(
        QueueName="steps.fifo",
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"},
    )["QueueUrl"]
    for _ in range(2):  # the same body twice: one message, by content
        sqs.send_message(QueueUrl=fifo, MessageBody="same", MessageGroupId="g")
    sqs.send_message_batch(
        QueueUrl=fifo,
        Entries=[
            {"Id": "a", "MessageBody": "b1", "MessageGroupId": "g", "MessageDeduplicationId": "k"},
            {"Id": "b", "MessageBody": "b2", "MessageGroupId": "g", "MessageDeduplicationId": "k"},
        ],
    )
    attributes = sqs.get_queue_attributes(QueueUrl=fifo, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "2"
    assert attributes["ContentBasedDeduplication"] == "true"

    standard = sqs.create_queue(QueueName="plain")["QueueUrl"]
    sqs.send_message_batch(
        QueueUrl=standard, Entries=[{"Id": str(i), "MessageBody": "m"} for i in range(10)]
    )
    attributes = sqs.get_queue_attributes(QueueUrl=standard, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "10"
    assert "ContentBasedDeduplication" not in attributes


def test_sends_and_deletes_at_once_lose_and_revive_nothing(sped_up: None) -> None:
    sqs = boto3.client("sqs", region_name="us-east-1")
    url = sqs.create_queue(QueueName="busy")["QueueUrl"]
    queue = models.sqs_backends["123456789012"]["us-east-1"].get_queue("busy")
    # Held messages that every delete walks past: the race's window, as a deep queue has.
    for _ in range(200):
        entries: list[SendMessageBatchRequestEntryTypeDef] = [
            {"Id": str(i), "MessageBody": "held"} for i in range(10)
        ]
        sqs.send_message_batch(QueueUrl=url, Entries=entries)
    while sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=600).get(
        "Messages"
    ):
        pass
    sent, deleted, errors = 400, [], []

    def send(first: int) -> None:
        for start in range(first, sent, 40):
            entries: list[SendMessageBatchRequestEntryTypeDef] = [
                {"Id": str(i), "MessageBody": str(start + i)} for i in range(10)
            ]
            sqs.send_message_batch(QueueUrl=url, Entries=entries)

    def consume() -> None:
        idle = 0
        try:
            while idle < 20:
                got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
                idle = 0 if got else idle + 1
                for message in got:
                    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
                    deleted.append(message["Body"])
        except Exception as error:  # a receive the emulator answered with a server error
            errors.append(error)

    threads = [threading.Thread(target=send, args=(i * 10,)) for i in range(4)]
    threads += [threading.Thread(target=consume) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(deleted) == sent and len(set(deleted)) == sent
    assert len(queue._messages) == 2000


def test_receives_at_once_hand_each_message_to_one_and_long_polls_still_wait(
    sped_up: None,
) -> None:
    sqs = boto3.client("sqs", region_name="us-east-1")
    url = sqs.create_queue(QueueName="shared")["QueueUrl"]
    for start in range(0, 400, 10):
        entries: list[SendMessageBatchRequestEntryTypeDef] = [
            {"Id": str(i), "MessageBody": str(start + i)} for i in range(10)
        ]
        sqs.send_message_batch(QueueUrl=url, Entries=entries)
    received: list[str] = []
    errors: list[Exception] = []

    def receive() -> None:
        try:
            while got := sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=600
            ).get("Messages", []):
                received.extend(message["Body"] for message in got)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=receive) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(received, key=int) == [str(i) for i in range(400)]

    # A long poll waits (outside the lock) and takes what is sent while it waits.
    began = time.monotonic()
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages", []) == []
    assert time.monotonic() - began >= 0.9
    threading.Timer(0.5, lambda: sqs.send_message(QueueUrl=url, MessageBody="late")).start()
    got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5)["Messages"]
    assert [message["Body"] for message in got] == ["late"]
