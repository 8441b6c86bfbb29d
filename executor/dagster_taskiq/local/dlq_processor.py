"""The DLQ processor on a laptop: the same ``DeadLetterProcessor`` as the Lambda, fed by
polling the local dead-letter queue (what Lambda's SQS event source does in AWS).

A letter is deleted only once processed; one that fails stays for the next poll.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import boto3

from dagster_taskiq.core.errors import QueueUnavailable
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.observability import module_logger
from dagster_taskiq.core.settings import ENV_SIGNING_KEY
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.dead_letters.processor import (
    DeadLetter,
    DeadLetterProcessor,
    DeadLetterResult,
    SnsAlerts,
)
from dagster_taskiq.local.endpoints import REGION

if TYPE_CHECKING:
    # Types only: the stack starts this consumer, this consumer never starts a stack.
    from dagster_taskiq.local.stack import LocalStack

log = module_logger(__name__)


class LocalDeadLetters:
    def __init__(
        self,
        stack: LocalStack,
        *,
        on_result: Callable[[DeadLetterResult], None] | None = None,
        dagster_ui_url: str | None = None,
    ) -> None:
        self._dlq = SqsQueue(stack.dlq_url, endpoint_url=stack.sqs_endpoint)
        self._ledger = Ledger(stack.database_url, pool_size=1)
        sns = boto3.client("sns", region_name=REGION, endpoint_url=stack.sqs_endpoint)
        self.processor = DeadLetterProcessor(
            self._ledger,
            SnsAlerts(sns, stack.alert_topic_arn),
            signing_key=os.environ.get(ENV_SIGNING_KEY) or None,
            dagster_ui_url=dagster_ui_url,
        )
        self.on_result = on_result
        self.results: list[DeadLetterResult] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="local-dlq", daemon=True)

    def start(self) -> LocalDeadLetters:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                letters = self._dlq.receive(max_messages=10, wait_seconds=1, visibility_timeout=30)
            except QueueUnavailable as e:
                log.warning("Local DLQ unreadable: %s", e)
                self._stop.wait(1)
                continue
            for received in letters:
                letter = DeadLetter(received.message_id, received.body, received.receive_count)
                try:
                    result = self.processor.process(letter)
                    self._dlq.delete(received.receipt_handle)
                except Exception:
                    # Like a failed record in the Lambda's batch: SQS delivers it again.
                    log.exception("Dead letter not processed; it will be read again")
                    continue
                self.results.append(result)
                if self.on_result is not None:
                    self.on_result(result)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._ledger.dispose()
