"""Step-triggered scale-out: wake the scaler when steps arrive and no worker runs.

The scheduled scaler ticks once a minute. A run launched on an idle system would wait
for that tick before its first worker even starts, so the executor invokes the scaler
asynchronously as soon as it queues steps and sees no running worker. Debounced: at
most one check per ``debounce_seconds``. Off unless a scaler function is configured.
Never raises into the executor: a failed trigger only means waiting for the tick.

Dagster-free.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from dagster_taskiq.scaler import TRIGGER_SOURCE, EcsWorkerService, WorkerServiceUnavailable

if TYPE_CHECKING:
    from mypy_boto3_lambda.client import LambdaClient

log = logging.getLogger("dagster_taskiq.scale_trigger")


class ScaleOutTrigger:
    def __init__(
        self,
        *,
        function_name: str,
        lambda_client: LambdaClient,
        service: EcsWorkerService | None,
        debounce_seconds: float,
    ) -> None:
        self._function_name = function_name
        self._lambda = lambda_client
        self._service = service
        self._debounce = debounce_seconds
        self._last: float | None = None
        self._lock = threading.Lock()
        self.invocations = 0

    def steps_launched(self) -> threading.Thread | None:
        """Called on every launch; returns the background check it started, if any."""
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self._debounce:
                return None
            self._last = now
        thread = threading.Thread(target=self._check_and_invoke, daemon=True)
        thread.start()
        return thread

    def _check_and_invoke(self) -> None:
        if self._service is not None:
            try:
                running = self._service.running_count()
            except WorkerServiceUnavailable as e:
                log.warning("Could not read the worker service; invoking the scaler: %s", e)
                running = 0
            if running > 0:
                return
        payload = {"source": TRIGGER_SOURCE, "reason": "steps queued and no worker running"}
        try:
            self._lambda.invoke(
                FunctionName=self._function_name,
                InvocationType="Event",
                Payload=json.dumps(payload).encode(),
            )
            self.invocations += 1
        except (ClientError, BotoCoreError) as e:
            log.warning("Could not invoke the scaler %s: %s", self._function_name, e)
