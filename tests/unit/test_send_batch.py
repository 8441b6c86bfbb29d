"""SendMessageBatch: an outcome per message, whatever SQS accepted or refused."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from dagster_taskiq.core.errors import QueueUnavailable
from dagster_taskiq.core.sqs import OutgoingMessage, SqsQueue


class Client:
    def __init__(self, answer: dict[str, Any] | Exception) -> None:
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    def send_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _queue(client: Client, url: str = "https://sqs/q") -> SqsQueue:
    return SqsQueue(url, client=client)  # type: ignore[arg-type]


def test_each_message_gets_its_outcome_in_order() -> None:
    client = Client(
        {
            "Successful": [{"Id": "2", "MessageId": "m2"}, {"Id": "0", "MessageId": "m0"}],
            "Failed": [
                {"Id": "1", "SenderFault": True, "Code": "InvalidParameterValue", "Message": "x"},
                {"Id": "3", "SenderFault": False, "Code": "InternalError", "Message": "y"},
            ],
        }
    )
    outcomes = _queue(client).send_batch([OutgoingMessage(f"b{i}") for i in range(5)])
    assert [o.message_id for o in outcomes] == ["m0", None, "m2", None, None]
    assert "InvalidParameterValue" in (outcomes[1].error or "") and not outcomes[1].retryable
    assert "InternalError" in (outcomes[3].error or "") and outcomes[3].retryable
    assert outcomes[4].retryable, "an entry the answer leaves out is sent again"
    (call,) = client.calls
    assert [e["MessageBody"] for e in call["Entries"]] == [f"b{i}" for i in range(5)]
    assert "MessageGroupId" not in call["Entries"][0]


def test_a_fifo_queue_gets_groups_and_deduplication_ids() -> None:
    client = Client({"Successful": [{"Id": "0", "MessageId": "m"}]})
    _queue(client, "https://sqs/q.fifo").send_batch(
        [OutgoingMessage("b", group_id="run", dedup_id="run:step:0")]
    )
    (entry,) = client.calls[0]["Entries"]
    assert entry["MessageGroupId"] == "run" and entry["MessageDeduplicationId"] == "run:step:0"


def test_a_failed_call_raises_and_a_batch_holds_ten() -> None:
    error = ClientError({"Error": {"Code": "AWS.SimpleQueueService.NonExistentQueue"}}, "Send")
    with pytest.raises(QueueUnavailable, match="NonExistentQueue"):
        _queue(Client(error)).send_batch([OutgoingMessage("b")])
    with pytest.raises(ValueError):
        _queue(Client({})).send_batch([OutgoingMessage("b")] * 11)
