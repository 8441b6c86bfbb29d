"""The heartbeat hides a claimed message for its lease at its first renewal, and a step
that ends before then costs no visibility call; a message whose heartbeat stops (its
worker died) comes back only once its ledger lease has expired. On the real ledger and
SQS emulator."""

from __future__ import annotations

import time
import uuid

import boto3
import pytest
from aws_lambda_powertools import Logger

from dagster_taskiq.core.ledger import ClaimOutcome, Ledger
from dagster_taskiq.core.sqs import ReceivedMessage, SqsQueue
from dagster_taskiq.worker.heartbeat import VISIBILITY_MARGIN, Heartbeat, Lease, lease_within
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
        hidden_for = 60 + int(VISIBILITY_MARGIN)
        assert queue.visibility_changes == [hidden_for]
        # Later beats renew the ledger lease; visibility again only after lease/3.
        renewed_at = long.last_renewed
        wait_for(lambda: long.last_renewed > renewed_at, timeout=15, what="a second beat")
        assert queue.visibility_changes == [hidden_for]
    finally:
        heartbeat.stop()
        heartbeat.join(5)


def test_a_message_whose_heartbeat_stops_comes_back_only_after_its_lease(
    ledger: Ledger, sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each lease stops being renewed at another moment, as a worker dies at any moment:
    before the first renewal (hidden by the receive only), just after a visibility
    extension, and between two ledger renewals that followed one. Every message comes back
    to a receive that can claim it at once, never to one that finds its lease live."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=sqs_endpoint)
    url = sqs.create_queue(QueueName=f"deaths-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    queue = SqsQueue(url, endpoint_url=sqs_endpoint, region="us-east-1")
    lease_seconds = 6
    log = Logger(service="test")
    # Ledger renewals every second, visibility every lease/3 = 2 s: they drift apart.
    heartbeat = Heartbeat(
        ledger=ledger,
        protection=TaskProtection(None, log),
        log=log,
        max_interval=1,
        first_renewal_after=2,
    )
    heartbeat.start()
    try:
        leases: list[tuple[Lease, float]] = []
        for dies_after in (0.5, 2.3, 3.6):
            key = f"{uuid.uuid4()}:step:0"
            ledger.enqueue(
                key, run_id="run", step_key="step", attempt=0, payload_hash="h", ttl_seconds=60
            )
            queue.send(key)
            (received,) = queue.receive(max_messages=1, wait_seconds=1, visibility_timeout=4)
            granted = lease_within(received.hidden_until, lease_seconds, time.monotonic())
            claim = ledger.claim(key, worker_id="w", lease_seconds=granted, payload_hash="h")
            assert claim.outcome is ClaimOutcome.CLAIMED
            lease = Lease(
                key,
                claim.fencing_token,
                queue,
                received.receipt_handle,
                lease_seconds,
                on_change=lambda _: None,
                hidden_until=received.hidden_until,
                granted_seconds=granted,
            )
            heartbeat.add(lease)
            leases.append((lease, time.monotonic() + dies_after))
        pending = dict.fromkeys(lease.key for lease, _ in leases)
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            now = time.monotonic()
            for lease, dies_at in leases:
                if now >= dies_at:
                    heartbeat.remove(lease)  # the worker is gone: no more renewals
            for message in queue.receive(max_messages=10, wait_seconds=1, visibility_timeout=30):
                retaken = ledger.claim(
                    message.body, worker_id="next", lease_seconds=30, payload_hash="h"
                )
                assert retaken.outcome is ClaimOutcome.CLAIMED, (
                    f"{message.body} came back while its lease was live: {retaken}"
                )
                assert message.receive_count == 2
                pending.pop(message.body, None)
        assert not pending, f"never came back: {list(pending)}"
    finally:
        heartbeat.stop()
        heartbeat.join(5)
