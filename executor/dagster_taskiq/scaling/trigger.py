"""Step-triggered scale-out: wake the scaler when steps arrive and the pool wants no worker.

The scheduled scaler evaluates a few times a minute. A run launched on an idle system would
wait for the next evaluation before its first worker even starts, so the executor invokes
the scaler asynchronously as soon as it queues steps and the worker service's desired count
is zero. Each run invokes at most once per ``debounce_seconds``, counted from an invocation
that happened: a check that found workers wanted does not count, so a pool that scales to
zero between a run's root step and its fan-out is woken by the fan-out. Checks themselves
are at most one per ``CHECK_INTERVAL_SECONDS`` (or per debounce, if shorter), so a fan-out
of a thousand launches reads the service a few times, not a thousand. Off unless a scaler
function is configured. Never raises into the executor: a failed trigger only means waiting
for the next evaluation.

Dagster-free.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from dagster_taskiq.core.errors import WorkerServiceUnavailable
from dagster_taskiq.core.observability import module_logger
from dagster_taskiq.scaling.scaler import TRIGGER_SOURCE, EcsWorkerService

if TYPE_CHECKING:
    from mypy_boto3_lambda.client import LambdaClient

log = module_logger(__name__)

# The least time between two reads of the worker service by one run's trigger.
CHECK_INTERVAL_SECONDS = 2.0


class ScaleOutTrigger:
    def __init__(
        self,
        *,
        function_name: str,
        lambda_client: LambdaClient,
        service: EcsWorkerService | None,
        debounce_seconds: float,
        check_interval_seconds: float = CHECK_INTERVAL_SECONDS,
    ) -> None:
        self._function_name = function_name
        self._lambda = lambda_client
        self._service = service
        self._debounce = debounce_seconds
        self._check_interval = min(check_interval_seconds, debounce_seconds)
        self._last_check: float | None = None
        self._last_invocation: float | None = None
        self._lock = threading.Lock()
        self.invocations = 0

    def steps_launched(self) -> threading.Thread | None:
        """Called on every launch; returns the background check it started, if any."""
        now = time.monotonic()
        with self._lock:
            if self._last_invocation is not None and now - self._last_invocation < self._debounce:
                return None
            if self._last_check is not None and now - self._last_check < self._check_interval:
                return None
            self._last_check = now
        thread = threading.Thread(target=self._check_and_invoke, daemon=True)
        thread.start()
        return thread

    def _check_and_invoke(self) -> None:
        if self._service is not None:
            try:
                desired = self._service.desired_count()
            except WorkerServiceUnavailable as e:
                log.warning("Could not read the worker service; invoking the scaler: %s", e)
                desired = 0
            if desired > 0:
                return  # the scaler has asked for workers already
        payload = {"source": TRIGGER_SOURCE, "reason": "steps queued and no worker wanted"}
        try:
            self._lambda.invoke(
                FunctionName=self._function_name,
                InvocationType="Event",
                Payload=json.dumps(payload).encode(),
            )
        except (ClientError, BotoCoreError) as e:
            log.warning("Could not invoke the scaler %s: %s", self._function_name, e)
            return
        with self._lock:
            self._last_invocation = time.monotonic()
            self.invocations += 1
