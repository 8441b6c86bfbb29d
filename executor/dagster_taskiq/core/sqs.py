"""The SQS calls the system makes, in one place, with errors that say what to fix.

Dagster-free: the Lambdas import this module.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dagster_taskiq.core.errors import QueueUnavailable
from dagster_taskiq.core.settings import DEFAULT_REGION

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient

# SQS caps a single visibility extension at 12 hours.
MAX_VISIBILITY_SECONDS = 43_200
LONG_POLL_SECONDS = 20
# SendMessageBatch takes at most 10 messages, and at most this many bytes of bodies in all
# (the classic limit: some regions and emulators have not raised it to 1 MiB).
MAX_BATCH_MESSAGES = 10
MAX_BATCH_BYTES = 262_144


@dataclass(frozen=True)
class ReceivedMessage:
    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_timestamp_ms: int
    queue_url: str  # the queue it was received from
    # time.monotonic() at which the receive's visibility timeout lets the message be seen
    # again, read when the answer arrived (the timeout started a little earlier: the
    # worker's lease keeps a margin below it). 0: unknown, treat as visible now.
    hidden_until: float = 0.0


@dataclass(frozen=True)
class OutgoingMessage:
    body: str
    group_id: str | None = None  # FIFO queues only
    dedup_id: str | None = None  # FIFO queues only


@dataclass(frozen=True)
class SendOutcome:
    """One entry of a SendMessageBatch: its message id, or why SQS refused it."""

    message_id: str | None
    error: str | None = None
    # SQS's SenderFault false: the service failed on its side, and sending again may work.
    retryable: bool = False


@dataclass(frozen=True)
class QueueDepth:
    visible: int
    delayed: int
    in_flight: int


def sqs_client(
    *, region: str | None = None, endpoint_url: str | None = None, read_timeout: int = 30
) -> SQSClient:
    # In Lambda and ECS, AWS_REGION names the region the code runs in.
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    config = Config(
        region_name=region or DEFAULT_REGION,
        connect_timeout=5,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": 3},
    )
    client: SQSClient = boto3.session.Session().client(
        "sqs", endpoint_url=endpoint_url or None, config=config
    )
    return client


class SqsQueue:
    """One queue. Every method raises QueueUnavailable on a transport or service error."""

    def __init__(
        self,
        url: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        client: SQSClient | None = None,
    ) -> None:
        self.url = url
        self.client = client or sqs_client(
            region=region, endpoint_url=endpoint_url, read_timeout=LONG_POLL_SECONDS + 10
        )

    def __repr__(self) -> str:
        return f"SqsQueue({self.url})"

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(QueueUrl=self.url, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            raise QueueUnavailable(f"SQS {what} on {self.url} failed ({code}): {e}") from e
        except BotoCoreError as e:
            raise QueueUnavailable(f"SQS {what} on {self.url} failed: {e}") from e

    @property
    def is_fifo(self) -> bool:
        return self.url.endswith(".fifo")

    def send(self, body: str, *, group_id: str | None = None, dedup_id: str | None = None) -> str:
        kwargs: dict[str, Any] = {"MessageBody": body}
        if self.is_fifo:
            kwargs["MessageGroupId"] = group_id or "default"
            if dedup_id:
                kwargs["MessageDeduplicationId"] = dedup_id
        response = self._call("SendMessage", self.client.send_message, **kwargs)
        return str(response["MessageId"])

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendOutcome]:
        """One SendMessageBatch: an outcome per message, in order. SQS accepts or refuses
        each entry on its own; a failure of the whole call raises QueueUnavailable."""
        if not 0 < len(messages) <= MAX_BATCH_MESSAGES:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH_MESSAGES} messages")
        entries: list[dict[str, Any]] = []
        for index, message in enumerate(messages):
            entry: dict[str, Any] = {"Id": str(index), "MessageBody": message.body}
            if self.is_fifo:
                entry["MessageGroupId"] = message.group_id or "default"
                if message.dedup_id:
                    entry["MessageDeduplicationId"] = message.dedup_id
            entries.append(entry)
        response = self._call("SendMessageBatch", self.client.send_message_batch, Entries=entries)
        # An entry the answer does not mention is sent again: a duplicate is suppressed.
        missing = SendOutcome(None, "SQS's answer did not mention the message", retryable=True)
        outcomes = [missing] * len(messages)
        for sent in response.get("Successful", []):
            outcomes[int(sent["Id"])] = SendOutcome(str(sent["MessageId"]))
        for failed in response.get("Failed", []):
            code, text = failed.get("Code", ""), failed.get("Message", "")
            outcomes[int(failed["Id"])] = SendOutcome(
                None,
                f"SQS SendMessageBatch on {self.url} refused the message ({code}): {text}",
                retryable=not failed.get("SenderFault", False),
            )
        return outcomes

    def receive(
        self, *, max_messages: int, wait_seconds: int, visibility_timeout: int
    ) -> list[ReceivedMessage]:
        response = self._call(
            "ReceiveMessage",
            self.client.receive_message,
            MaxNumberOfMessages=max(1, min(10, max_messages)),
            WaitTimeSeconds=wait_seconds,
            VisibilityTimeout=min(visibility_timeout, MAX_VISIBILITY_SECONDS),
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        )
        hidden_until = time.monotonic() + min(visibility_timeout, MAX_VISIBILITY_SECONDS)
        return [
            ReceivedMessage(
                message_id=m["MessageId"],
                receipt_handle=m["ReceiptHandle"],
                body=m.get("Body", ""),
                receive_count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                sent_timestamp_ms=int(m.get("Attributes", {}).get("SentTimestamp", 0)),
                queue_url=self.url,
                hidden_until=hidden_until,
            )
            for m in response.get("Messages", [])
        ]

    def delete(self, receipt_handle: str) -> None:
        self._call("DeleteMessage", self.client.delete_message, ReceiptHandle=receipt_handle)

    def change_visibility(self, receipt_handle: str, seconds: int) -> None:
        self._call(
            "ChangeMessageVisibility",
            self.client.change_message_visibility,
            ReceiptHandle=receipt_handle,
            VisibilityTimeout=max(0, min(int(seconds), MAX_VISIBILITY_SECONDS)),
        )

    def attributes(self) -> dict[str, str]:
        response = self._call(
            "GetQueueAttributes", self.client.get_queue_attributes, AttributeNames=["All"]
        )
        return dict(response.get("Attributes", {}))

    def depth(self) -> QueueDepth:
        attrs = self.attributes()
        return QueueDepth(
            visible=int(attrs.get("ApproximateNumberOfMessages", 0)),
            delayed=int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
            in_flight=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
        )

    def max_receive_count(self) -> int | None:
        """The redrive policy's maxReceiveCount, or None if the queue has no DLQ."""
        policy = self.attributes().get("RedrivePolicy")
        return self.parse_max_receive_count(policy) if policy else None

    @staticmethod
    def parse_max_receive_count(redrive_policy: str) -> int:
        return int(json.loads(redrive_policy)["maxReceiveCount"])


def sqs_queues(
    urls: Sequence[str], *, region: str | None = None, endpoint_url: str | None = None
) -> list[SqsQueue]:
    """Several queues (a pool's step queue and lane, a worker's queues) on one client."""
    first = SqsQueue(urls[0], region=region, endpoint_url=endpoint_url)
    return [first, *(SqsQueue(url, client=first.client) for url in urls[1:])]


def create_queue_with_dlq(
    client: SQSClient,
    name: str,
    *,
    visibility_timeout: int,
    message_retention: int,
    max_receive_count: int,
) -> tuple[str, str]:
    """Create (or find) a queue and its dead-letter queue. Returns (queue_url, dlq_url).

    Used by the local stack and the tests; in AWS the CDK app owns the queues.
    """
    fifo = name.endswith(".fifo")
    base = name.removesuffix(".fifo")
    dlq_name = f"{base}-dlq.fifo" if fifo else f"{base}-dlq"
    fifo_attrs: dict[Any, str] = {"FifoQueue": "true"} if fifo else {}
    dlq_url = client.create_queue(
        QueueName=dlq_name,
        # Longer than the main queue's, so a dead letter outlives the original.
        Attributes={"MessageRetentionPeriod": str(MAX_RETENTION_SECONDS), **fifo_attrs},
    )["QueueUrl"]
    dlq_arn = client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive_count})
    queue_url = client.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": str(visibility_timeout),
            "MessageRetentionPeriod": str(message_retention),
            "RedrivePolicy": redrive,
            **fifo_attrs,
        },
    )["QueueUrl"]
    return queue_url, dlq_url


MAX_RETENTION_SECONDS = 1_209_600
