"""The step handler: launch a step as an SQS message, judge its health from the ledger.

Health is read from the ledger and the event log, never from memory, so a resumed run
(a new run worker process) judges in-flight steps correctly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from dagster import DagsterEvent, MetadataValue
from dagster._core.events import EngineEventData
from dagster._core.execution.plan.objects import StepFailureData
from dagster._core.executor.step_delegating import (
    CheckStepHealthResult,
    StepHandler,
    StepHandlerContext,
)
from dagster._serdes import serialize_value
from dagster_postgres.utils import DagsterPostgresException
from dagster_shared.error import SerializableErrorInfo
from dagster_shared.record import copy
from sqlalchemy.exc import InterfaceError, OperationalError

from dagster_taskiq.attempts import attempt_outcome
from dagster_taskiq.ledger import Ledger, LedgerUnavailable, Status, StepRecord
from dagster_taskiq.messages import StepMessage, encode, idempotency_key
from dagster_taskiq.queue import QueueUnavailable, SqsQueue
from dagster_taskiq.routing import Routing, RoutingError
from dagster_taskiq.scale_trigger import ScaleOutTrigger

T = TypeVar("T")
log = logging.getLogger("dagster_taskiq")

# What Dagster's PostgreSQL storage raises when the database restarts or fails over.
DAGSTER_STORAGE_OUTAGES = (OperationalError, InterfaceError, DagsterPostgresException)
# Dagster checks the health of every in-flight step in one round; one read of the run's
# ledger records serves the round (1000 in-flight steps: one query, not 1000).
HEALTH_SNAPSHOT_SECONDS = 1.0


@dataclass(frozen=True)
class LaunchSettings:
    lease_seconds: int
    idempotency_key_ttl: int
    max_message_bytes: int
    signing_key: str | None
    pickup_timeout: int | None
    retry_seconds: float = 60.0  # a launch rides out an outage of SQS or the ledger this long


def retry_while_unreachable(
    action: Callable[[], T],
    deadline: float,
    *,
    errors: tuple[type[Exception], ...] = (QueueUnavailable, LedgerUnavailable),
    what: str = "SQS or the ledger",
) -> T:
    """Retry a call through an outage (``errors``), until ``deadline`` (monotonic).

    The executor's calls are idempotent: the ledger row is inserted once per key, a
    second message for the same key is suppressed by the worker as a duplicate, and an
    event-log read moves its cursor only when it succeeds.
    """
    delay = 0.5
    while True:
        try:
            return action()
        except errors as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s unreachable; retrying in %.1f s: %s", what, delay, e)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def step_key_and_attempt(context: StepHandlerContext) -> tuple[str, int]:
    args = context.execute_step_args
    keys = args.step_keys_to_execute or []
    assert len(keys) == 1, "The taskiq executor launches one step per message"
    step_key = keys[0]
    attempt = 0
    if args.known_state is not None:
        attempt = args.known_state.get_retry_state().get_attempt_count(step_key)
    return step_key, attempt


class SqsStepHandler(StepHandler):
    def __init__(
        self,
        *,
        queues: dict[str, SqsQueue],
        routing: Routing,
        ledger: Ledger,
        settings: LaunchSettings,
        triggers: dict[str, ScaleOutTrigger] | None = None,
    ) -> None:
        super().__init__()
        self._queues = queues  # by URL: every queue and lane of the routing
        self._routing = routing
        self._ledger = ledger
        self._settings = settings
        self._triggers = triggers or {}
        self._snapshot: tuple[str, float, dict[str, StepRecord]] | None = None

    @property
    def name(self) -> str:
        return "SqsStepHandler"

    def _key(self, context: StepHandlerContext) -> tuple[str, str, int]:
        step_key, attempt = step_key_and_attempt(context)
        run_id = context.execute_step_args.run_id
        return idempotency_key(run_id, step_key, attempt), step_key, attempt

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        key, step_key, attempt = self._key(step_handler_context)
        run = step_handler_context.dagster_run
        run_id = run.run_id
        try:
            destination = self._routing.destination(
                step_key, step_handler_context.step_tags[step_key], run.tags
            )
        except RoutingError as e:
            yield self._fail_at_launch(step_handler_context, key, step_key, attempt, str(e))
            return
        queue = self._queues[destination.url]
        # No secret travels: workers use their own instance, never the run worker's ref.
        args = copy(step_handler_context.execute_step_args, instance_ref=None)
        message = StepMessage.new(
            run_id=run_id,
            step_key=step_key,
            attempt=attempt,
            step_args=serialize_value(args),
            lease_seconds=self._settings.lease_seconds,
        )
        # Encoding checks the size before anything is recorded or sent.
        body = encode(
            message,
            signing_key=self._settings.signing_key,
            max_bytes=self._settings.max_message_bytes,
        )
        deadline = time.monotonic() + self._settings.retry_seconds
        inserted = retry_while_unreachable(
            lambda: self._ledger.enqueue(
                key,
                run_id=run_id,
                step_key=step_key,
                attempt=attempt,
                payload_hash=message.payload_hash,
                ttl_seconds=self._settings.idempotency_key_ttl,
                queue_url=queue.url,
            ),
            deadline,
        )
        try:
            message_id = retry_while_unreachable(
                lambda: queue.send(
                    body,
                    group_id=self._routing.message_group(run_id, step_key),
                    dedup_id=key,
                ),
                deadline,
            )
        except QueueUnavailable as e:
            if inserted:
                self._ledger.abandon(key, f"The step message could not be sent: {e}")
            raise
        trigger = self._triggers.get(queue.url)
        if trigger is not None:
            trigger.steps_launched()
        lane = " (priority lane)" if destination.in_priority_lane else ""
        # Creating the event writes it to the event log: a database restart mid-write
        # would otherwise fail the whole run for a step that is safely queued. A write
        # retried after a lost answer shows the event twice, which harms nothing.
        yield retry_while_unreachable(
            lambda: DagsterEvent.step_worker_starting(
                step_handler_context.get_step_context(step_key),
                message=f'Queued step "{step_key}" (attempt {attempt + 1}) on queue '
                f'"{destination.route.name}"{lane}.',
                metadata={
                    "idempotency_key": MetadataValue.text(key),
                    "message_id": MetadataValue.text(message_id),
                    "queue": MetadataValue.text(destination.route.name),
                    "queue_url": MetadataValue.text(queue.url),
                    "priority": MetadataValue.int(destination.priority),
                },
            ),
            time.monotonic() + self._settings.retry_seconds,
            errors=DAGSTER_STORAGE_OUTAGES,
            what="The event log",
        )

    def _fail_at_launch(
        self, context: StepHandlerContext, key: str, step_key: str, attempt: int, reason: str
    ) -> DagsterEvent:
        """The step fails, with the reason, before anything is sent; the run goes on as
        after any step failure. The ledger records the attempt as failed, for operators
        and for the health check."""
        deadline = time.monotonic() + self._settings.retry_seconds

        def record() -> None:
            self._ledger.enqueue(
                key,
                run_id=context.execute_step_args.run_id,
                step_key=step_key,
                attempt=attempt,
                payload_hash="",
                ttl_seconds=self._settings.idempotency_key_ttl,
            )
            self._ledger.abandon(key, reason)

        retry_while_unreachable(record, deadline)
        return DagsterEvent.step_failure_event(
            step_context=context.get_step_context(step_key),
            step_failure_data=StepFailureData(  # type: ignore[no-untyped-call]
                error=SerializableErrorInfo(message=reason, stack=[], cls_name="RoutingError"),
                user_failure_data=None,
            ),
        )

    def _health_record(self, key: str, run_id: str) -> StepRecord | None:
        """The ledger record, from a snapshot of the run's records at most
        HEALTH_SNAPSHOT_SECONDS old. Statuses only move forward, and a stale non-terminal
        one is judged healthy until the next round; a key the snapshot lacks is read."""
        now = time.monotonic()
        snapshot = self._snapshot
        if snapshot is None or snapshot[0] != run_id or now - snapshot[1] > HEALTH_SNAPSHOT_SECONDS:
            records = {r.idempotency_key: r for r in self._ledger.for_run(run_id)}
            snapshot = self._snapshot = (run_id, now, records)
        record = snapshot[2].get(key)
        return record if record is not None else self._ledger.get(key)

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        key, step_key, attempt = self._key(step_handler_context)
        record = self._health_record(key, step_handler_context.execute_step_args.run_id)
        if record is None:
            return CheckStepHealthResult.unhealthy(
                f"No ledger record for {key}: the step was never queued, or its record expired."
            )
        status = record.status
        if status is Status.DEAD_LETTERED:
            return CheckStepHealthResult.unhealthy(
                f"Step {step_key} was dead-lettered after {record.deliveries} deliveries: "
                f"{record.error or 'no worker could complete it'}"
            )
        if status is Status.ENQUEUED:
            timeout = self._settings.pickup_timeout
            if timeout and record.age_seconds > timeout:
                reason = (
                    f"Step {step_key} was not picked up by any worker within {timeout} s. "
                    f"Are workers running and consuming {record.queue_url or 'its queue'}?"
                )
                # Only if no worker claimed it meanwhile: a late worker then finds it terminal.
                if self._ledger.abandon(key, reason):
                    return CheckStepHealthResult.unhealthy(reason)
            return CheckStepHealthResult.healthy()
        if status in (Status.SUCCEEDED, Status.FAILED):
            # The worker writes the step's events before it records completion, so a
            # completed attempt without an ending in the event log never ran to one.
            instance = step_handler_context.instance
            run_id = step_handler_context.execute_step_args.run_id
            if attempt_outcome(instance, run_id, step_key, attempt) is not None:
                return CheckStepHealthResult.healthy()
            return CheckStepHealthResult.unhealthy(
                f"Step {step_key} ended without running: {record.error or status.value}"
            )
        # RUNNING (a live lease, or an expired one awaiting redelivery) and cancellation.
        return CheckStepHealthResult.healthy()

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        key, step_key, _ = self._key(step_handler_context)
        was = self._ledger.request_cancel(key)
        if was is None:
            return
        yield DagsterEvent.engine_event(
            step_handler_context.get_step_context(step_key),
            message=f"Requested cancellation of step {step_key} ({was.value.lower()}).",
            event_specific_data=EngineEventData(),
        )
