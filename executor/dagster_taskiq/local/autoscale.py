"""The scaler on a laptop: the same ``Scaler`` and policy as the Lambda, sizing the local
worker pool instead of an ECS service.

It evaluates on a tick, like the scheduled Lambda, and at once when the executor invokes
the scaler through Lambda's Invoke API (served locally by ``LambdaEndpoint``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.migrations import ensure_schema
from dagster_taskiq.core.observability import module_logger
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.scaling.policy import ScalingConfig
from dagster_taskiq.scaling.scaler import Evaluation, Scaler

if TYPE_CHECKING:
    # Types only: the stack starts this autoscaler, this autoscaler never starts a stack.
    from dagster_taskiq.local.stack import LocalStack, WorkerPool

LOCAL_SCALER_FUNCTION = "dagster-taskiq-local-scaler"

log = module_logger(__name__)


class LocalWorkerService:
    """The pool as the scaler sees an ECS service: a desired count it may set."""

    def __init__(self, pool: WorkerPool, name: str) -> None:
        self.pool = pool
        self.name = name

    def desired_count(self) -> int:
        return self.pool.target

    def set_desired_count(self, count: int) -> None:
        self.pool.scale_to(count, wait=False)


class LocalAutoscaler:
    def __init__(
        self,
        stack: LocalStack,
        pool: WorkerPool,
        config: ScalingConfig,
        *,
        tick_seconds: float = 10.0,
        on_evaluation: Callable[[Evaluation, str], None] | None = None,
        queue_url: str | None = None,
    ) -> None:
        self.pool = pool
        self.ledger = Ledger(stack.database_url, pool_size=1)
        self.scaler = Scaler(
            queues=[SqsQueue(queue_url or stack.queue_url, endpoint_url=stack.sqs_endpoint)],
            ledger=self.ledger,
            service=LocalWorkerService(pool, f"local/{stack.queue_url.rsplit('/', 1)[-1]}"),
            config=config,
        )
        # The local stack has the migrations; the scaler Lambda only checks.
        ensure_schema(self.ledger, component="local autoscaler")
        self.scaler.ensure_schema()
        self.tick_seconds = tick_seconds
        self.on_evaluation = on_evaluation
        self.evaluations: list[tuple[float, Evaluation, str]] = []  # (time.time(), ..., cause)
        self._recorded = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cause = "tick"
        self._thread = threading.Thread(target=self._run, name="local-scaler", daemon=True)

    def start(self) -> LocalAutoscaler:
        self._thread.start()
        return self

    def invoke(self, payload: Any) -> dict[str, str]:
        """The Lambda entry point the executor reaches through the local Invoke API."""
        self._cause = "invoked by the executor"
        self._wake.set()
        return {"status": "accepted"}

    def _run(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(self.tick_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            cause, self._cause = (self._cause if woken else "tick"), "tick"
            self.pool.replace_dead()
            try:
                evaluation = self.scaler.evaluate()
            except Exception:
                # Like a failed Lambda invocation: reported, and the next tick tries again.
                log.exception("Scaler evaluation failed")
                continue
            if evaluation is None:
                continue
            with self._recorded:
                self.evaluations.append((time.time(), evaluation, cause))
                self._recorded.notify_all()
            if self.on_evaluation is not None:
                self.on_evaluation(evaluation, cause)

    def wait_for_evaluation(
        self, matches: Callable[[Evaluation], bool], timeout: float
    ) -> Evaluation | None:
        """The first recorded evaluation that ``matches``, waiting up to ``timeout`` s for
        one; None if none came. Wait on this, not on the pool: the scaler sets the pool's
        target before its evaluation is recorded here."""

        def first() -> Evaluation | None:
            return next((e for _, e, _ in self.evaluations if matches(e)), None)

        with self._recorded:
            return self._recorded.wait_for(first, timeout)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        self.ledger.dispose()
