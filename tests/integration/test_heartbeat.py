"""The heartbeat hides a claimed message for its lease at its first renewal, and a step
that ends before then costs no visibility call; on the real ledger and SQS emulator."""

from __future__ import annotations

import time
import uuid

import boto3
import pytest
from aws_lambda_powertools import Logger

from dagster_taskiq.ledger import Ledger
from dagster_taskiq.queue import ReceivedMessage, SqsQueue
from dagster_taskiq.worker.heartbeat import Heartbeat, Lease
from dagster_taskiq.worker.protection import TaskProtection
from tests.helpers import wait_for


class RecordingQueue(SqsQueue):
    """The real queue, noting each visibility change."""

    def __init__(self, url: str, endpoint_url: str) -> None:
        super().__init__(url, endpoint_url=endpoint_url, region="us-east-1")
        self.visibility_changes: list[int] = []

    def change_visibility(self, receipt_handle: str, seconds: int) -> None:
        super().change_visibility(receipt_handle, seconds)
        self.visibility_changes.append(seconds)


def _claimed(ledger: Ledger, queue: SqsQueue) -> tuple[ReceivedMessage, int, str]:
    key = f"{uuid.uuid4()}:step:0"
    ledger.enqueue(key, run_id="run", step_key="step", attempt=0, payload_hash="h", ttl_seconds=60)
    queue.send(key)
    (received,) = queue.receive(max_messages=1, wait_seconds=1, visibility_timeout=15)
    claim = ledger.claim(key, worker_id="w", lease_seconds=60, payload_hash="h")
    return received, claim.fencing_token, key


def test_first_renewal_hides_the_message_for_the_lease(
    ledger: Ledger, sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=sqs_endpoint)
    url = sqs.create_queue(QueueName=f"heartbeat-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    queue = RecordingQueue(url, sqs_endpoint)
    log = Logger(service="test")
    heartbeat = Heartbeat(
        ledger=ledger,
        protection=TaskProtection(None, log),
        log=log,
        max_interval=2,
        first_renewal_after=0.5,
    )
    heartbeat.start()
    try:
        # A step that ends before the first renewal: no visibility call at all.
        received, token, key = _claimed(ledger, queue)
        short = Lease(key, token, queue, received.receipt_handle, 60, on_change=lambda _: None)
        heartbeat.add(short)
        heartbeat.remove(short)
        # A longer one: hidden for its lease at the first renewal, not at the 2 s beat.
        received, token, key = _claimed(ledger, queue)
        started = time.monotonic()
        long = Lease(key, token, queue, received.receipt_handle, 60, on_change=lambda _: None)
        heartbeat.add(long)
        wait_for(lambda: long.visibility_extended, timeout=5, what="the first renewal")
        assert time.monotonic() - started < 5
        assert queue.visibility_changes == [60]
        # Later beats renew the ledger lease; visibility again only after lease/3.
        renewed_at = long.last_renewed
        wait_for(lambda: long.last_renewed > renewed_at, timeout=15, what="a second beat")
        assert queue.visibility_changes == [60]
    finally:
        heartbeat.stop()
        heartbeat.join(5)
