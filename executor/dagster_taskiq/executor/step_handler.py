"""The step handler: launch a step as an SQS message, judge its health from the ledger.

Health is read from the ledger and the event log, never from memory, so a resumed run
(a new run worker process) judges in-flight steps correctly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dagster import DagsterEvent, DagsterEventType, MetadataValue
from dagster._core.events import EngineEventData
from dagster._core.execution.context.system import IStepContext
from dagster._core.execution.plan.objects import StepFailureData
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.plan.step import ExecutionStep
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

from dagster_taskiq.core.errors import LedgerUnavailable, QueueUnavailable, RoutingError
from dagster_taskiq.core.health import (
    DEFAULT_DEAD_LETTER_TIMEOUT,
    Action,
    HealthBounds,
    Verdict,
    judge,
)
from dagster_taskiq.core.ledger import PRESUMED_DEAD_LETTER, Ledger, NewStep, Status, StepRecord
from dagster_taskiq.core.messages import StepMessage, encode, idempotency_key
from dagster_taskiq.core.observability import module_logger
from dagster_taskiq.core.retry import retry_while_unreachable
from dagster_taskiq.core.routing import Destination, Routing
from dagster_taskiq.core.settings import DEFAULT_MAX_RECEIVE_COUNT, DEFAULT_MESSAGE_RETENTION
from dagster_taskiq.core.sqs import MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, OutgoingMessage, SqsQueue
from dagster_taskiq.executor.attempt_outcomes import attempt_outcome, run_endings
from dagster_taskiq.patches import EventBatch
from dagster_taskiq.scaling.trigger import ScaleOutTrigger

log = module_logger(__name__)

# What Dagster's PostgreSQL storage raises when the database restarts or fails over.
DAGSTER_STORAGE_OUTAGES = (OperationalError, InterfaceError, DagsterPostgresException)
# Dagster checks the health of every in-flight step in one round; one read of the run's
# ledger records serves the round (1000 in-flight steps: one query, not 1000).
HEALTH_SNAPSHOT_SECONDS = 1.0
# Batched launches: the steps put aside are recorded in the ledger and handed to the
# sending threads every SEND_AHEAD steps, so that sending overlaps Dagster's launching of
# the next ones; their events are written once a pass (``flush_launches``), or once
# MAX_HELD_LAUNCHES steps are held: Dagster may make thousands ready in one pass (a
# dynamic fan-out), each with its step context and message body.
SEND_AHEAD = 250
MAX_HELD_LAUNCHES = 1000
# SendMessageBatch calls in flight at once.
SEND_THREADS = 4
# The events a batch of launches writes together.
LAUNCH_EVENT_KINDS = frozenset(
    {DagsterEventType.STEP_WORKER_STARTING, DagsterEventType.ENGINE_EVENT}
)


@dataclass(frozen=True)
class LaunchSettings:
    lease_seconds: int
    idempotency_key_ttl: int
    max_message_bytes: int
    signing_key: str | None
    pickup_timeout: int | None
    retry_seconds: float = 60.0  # a launch rides out an outage of SQS or the ledger this long
    # What the health bounds derive from (see ``health``).
    max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT
    message_retention: int = DEFAULT_MESSAGE_RETENTION
    dead_letter_timeout: float = DEFAULT_DEAD_LETTER_TIMEOUT

    @property
    def bounds(self) -> HealthBounds:
        return HealthBounds(
            max_receive_count=self.max_receive_count,
            message_retention=self.message_retention,
            pickup_timeout=self.pickup_timeout,
            dead_letter_timeout=self.dead_letter_timeout,
        )


@dataclass(frozen=True)
class PendingLaunch:
    """A step ready to send: its ledger row, its message and where it goes."""

    context: StepHandlerContext
    step_context: IStepContext  # made once: its events and its message's known state
    key: str
    step_key: str
    attempt: int
    destination: Destination
    queue: SqsQueue
    payload_hash: str
    message: OutgoingMessage

    @property
    def run_id(self) -> str:
        return self.context.dagster_run.run_id


def _batches(launches: list[PendingLaunch]) -> Iterator[list[PendingLaunch]]:
    """SendMessageBatch-sized chunks: at most 10 messages and MAX_BATCH_BYTES of bodies."""
    chunk: list[PendingLaunch] = []
    size = 0
    for launch in launches:
        body = len(launch.message.body.encode())
        if chunk and (len(chunk) == MAX_BATCH_MESSAGES or size + body > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(launch)
        size += body
    if chunk:
        yield chunk


def step_known_state(
    known: KnownExecutionState | None, step: ExecutionStep
) -> KnownExecutionState | None:
    """What of the run's known state a step's message carries: of the outputs produced so
    far, those its own inputs read (what Dagster asks of them: ``can_load``), not all.

    Dagster hands every step the whole run's known state; in a dynamic fan-out of N steps
    that is N outputs in each of N messages, serialized by the run worker and read by a
    worker for every step (N²: at 10,000 steps, 1 MB and some 60 ms of serializing a
    message). An input still unresolved (a ``?`` in its step key) keeps them all."""
    if known is None:
        return None
    needed = {
        handle
        for step_input in step.step_inputs
        for handle in step_input.get_step_output_handle_dependencies()
    }
    if any("?" in handle.step_key for handle in needed):
        return known
    return known._replace(ready_outputs=known.ready_outputs & needed)


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
        batching: bool = False,
    ) -> None:
        super().__init__()
        # Put launches aside until ``flush_launches`` (the executor calls it once a pass
        # of Dagster's loop) rather than sending each as Dagster launches it.
        self.batching = batching
        self._pending: list[PendingLaunch] = []  # neither recorded nor sent yet
        # Recorded in the ledger and handed to a sending thread; their events to write.
        self._sending: list[
            tuple[list[PendingLaunch], Future[tuple[dict[str, str], dict[str, str]]]]
        ] = []
        self._inserted: set[str] = set()  # keys of ``_sending`` this handler inserted
        self._senders: ThreadPoolExecutor | None = None
        self._queues = queues  # by URL: every queue and lane of the routing
        self._routing = routing
        self._ledger = ledger
        self._settings = settings
        self._triggers = triggers or {}
        self._snapshot: tuple[str, float, dict[str, StepRecord]] | None = None
        self._passes: int | None = None  # see ``pass_ended``
        self._snapshot_pass: int | None = None
        self._ledger_down_since: float | None = None  # monotonic: the first failed check
        self._rejections: (
            tuple[tuple[str, float, dict[str, StepRecord]], dict[str, Mapping[str, Any]]] | None
        ) = None
        # The run's endings in the event log, by step, read for a snapshot (``_attempt_ended``).
        self._endings: (
            tuple[tuple[str, float, dict[str, StepRecord]], dict[str, int] | None] | None
        ) = None

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
        try:
            destination = self._routing.destination(
                step_key, step_handler_context.step_tags[step_key], run.tags
            )
        except RoutingError as e:
            yield self._fail_at_launch(step_handler_context, key, step_key, attempt, str(e))
            return
        launch = self._prepare(step_handler_context, key, step_key, attempt, destination)
        if not self.batching:
            yield from self._launch_now(launch)
            return
        # Sent with the other steps of this pass of Dagster's loop (see SEND_AHEAD).
        self._pending.append(launch)
        if len(self._pending) >= SEND_AHEAD:
            self._send_pending()
        if len(self._pending) + sum(len(chunk) for chunk, _ in self._sending) >= MAX_HELD_LAUNCHES:
            self.flush_launches()

    def _prepare(
        self,
        context: StepHandlerContext,
        key: str,
        step_key: str,
        attempt: int,
        destination: Destination,
    ) -> PendingLaunch:
        run_id = context.dagster_run.run_id
        args = context.execute_step_args
        step_context = context.get_step_context(step_key)
        # No secret travels: workers use their own instance, never the run worker's ref.
        args = copy(
            args,
            instance_ref=None,
            known_state=step_known_state(args.known_state, step_context.step),
        )
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
        return PendingLaunch(
            context=context,
            step_context=step_context,
            key=key,
            step_key=step_key,
            attempt=attempt,
            destination=destination,
            queue=self._queues[destination.url],
            payload_hash=message.payload_hash,
            message=OutgoingMessage(
                body, group_id=self._routing.message_group(run_id, step_key), dedup_id=key
            ),
        )

    def _launch_now(self, launch: PendingLaunch) -> Iterator[DagsterEvent]:
        """One step on its own, as Dagster launches it: ledger insert, SendMessage, event
        (``batch_launches`` false)."""
        key, queue = launch.key, launch.queue
        deadline = time.monotonic() + self._settings.retry_seconds
        inserted = retry_while_unreachable(
            lambda: self._ledger.enqueue(
                key,
                run_id=launch.run_id,
                step_key=launch.step_key,
                attempt=launch.attempt,
                payload_hash=launch.payload_hash,
                ttl_seconds=self._settings.idempotency_key_ttl,
                queue_url=queue.url,
            ),
            deadline,
        )
        outgoing = launch.message
        try:
            message_id = retry_while_unreachable(
                lambda: queue.send(
                    outgoing.body, group_id=outgoing.group_id, dedup_id=outgoing.dedup_id
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
        # Creating the event writes it to the event log: a database restart mid-write
        # would otherwise fail the whole run for a step that is safely queued. A write
        # retried after a lost answer shows the event twice, which harms nothing.
        yield retry_while_unreachable(
            lambda: self._queued_event(launch, message_id),
            time.monotonic() + self._settings.retry_seconds,
            errors=DAGSTER_STORAGE_OUTAGES,
            what="The event log",
        )

    def _queued_event(self, launch: PendingLaunch, message_id: str) -> DagsterEvent:
        destination = launch.destination
        lane = " (priority lane)" if destination.in_priority_lane else ""
        return DagsterEvent.step_worker_starting(
            launch.step_context,
            message=f'Queued step "{launch.step_key}" (attempt {launch.attempt + 1}) on queue '
            f'"{destination.route.name}"{lane}.',
            metadata={
                "idempotency_key": MetadataValue.text(launch.key),
                "message_id": MetadataValue.text(message_id),
                "queue": MetadataValue.text(destination.route.name),
                "queue_url": MetadataValue.text(launch.queue.url),
                "priority": MetadataValue.int(destination.priority),
            },
        )

    # -- batched launches -----------------------------------------------------------------

    def flush_launches(self) -> None:
        """Send the steps ``launch_step`` has put aside: a multi-row ledger insert, then
        SendMessageBatch per queue (10 a call, on sending threads), then one event-log
        write of their events.

        ``launch_step`` has returned for these steps, so a send that fails for good (after
        ``unreachable_retry_seconds`` of retries for a failure SQS says may pass) is not
        raised: the step's ledger row is marked FAILED with SQS's reason, and the next
        health check fails the step with it. The run fails here only if the ledger or the
        event log stays unreachable, as a launch one at a time would.
        """
        self._send_pending()
        if not self._sending:
            return
        sending, self._sending = self._sending, []
        inserted, self._inserted = self._inserted, set()
        sent: dict[str, str] = {}  # idempotency key -> message id
        failed: dict[str, str] = {}  # idempotency key -> why
        events = EventBatch(sending[0][0][0].context.instance)
        # This thread makes the events of each chunk as its answer comes, while the
        # sending threads wait on SQS for the next ones.
        with events.holding(LAUNCH_EVENT_KINDS):
            for chunk, answer in sending:
                chunk_sent, chunk_failed = answer.result()
                sent.update(chunk_sent)
                failed.update(chunk_failed)
                for launch in chunk:
                    self._launch_event(launch, sent.get(launch.key), failed.get(launch.key))
        queues = {
            launch.queue.url for chunk, _ in sending for launch in chunk if launch.key in sent
        }
        for url in queues:
            trigger = self._triggers.get(url)
            if trigger is not None:
                trigger.steps_launched()
        for key, why in failed.items():
            if key in inserted:
                retry_while_unreachable(
                    lambda k=key, w=why: self._ledger.abandon(  # type: ignore[misc]
                        k, f"The step message could not be sent: {w}"
                    ),
                    time.monotonic() + self._settings.retry_seconds,
                )
        # Creating the events wrote nothing yet: one write stores them all.
        retry_while_unreachable(
            events.write,
            time.monotonic() + self._settings.retry_seconds,
            errors=DAGSTER_STORAGE_OUTAGES,
            what="The event log",
        )

    def _send_pending(self) -> None:
        """Record the steps put aside in the ledger (ENQUEUED, one statement), then hand
        their messages to the sending threads. Raises if the ledger stays unreachable."""
        if not self._pending:
            return
        launches, self._pending = self._pending, []
        deadline = time.monotonic() + self._settings.retry_seconds
        new_steps = [
            NewStep(
                key=launch.key,
                run_id=launch.run_id,
                step_key=launch.step_key,
                attempt=launch.attempt,
                payload_hash=launch.payload_hash,
                queue_url=launch.queue.url,
            )
            for launch in launches
        ]
        self._inserted |= retry_while_unreachable(
            lambda: self._ledger.enqueue_many(
                new_steps, ttl_seconds=self._settings.idempotency_key_ttl
            ),
            deadline,
        )
        if self._senders is None:
            self._senders = ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="taskiq-send")
        by_queue: dict[str, list[PendingLaunch]] = {}
        for launch in launches:
            by_queue.setdefault(launch.queue.url, []).append(launch)
        for queued in by_queue.values():
            for chunk in _batches(queued):
                self._sending.append(
                    (chunk, self._senders.submit(self._send_batch, chunk, deadline))
                )

    def _send_batch(
        self, chunk: list[PendingLaunch], deadline: float
    ) -> tuple[dict[str, str], dict[str, str]]:
        """One SendMessageBatch, sending again what SQS says may pass until ``deadline``.
        Returns the message ids of the keys sent, and why the others were not."""
        sent: dict[str, str] = {}
        failed: dict[str, str] = {}
        queue = chunk[0].queue
        remaining, delay = chunk, 0.5
        while remaining:
            try:
                outcomes = queue.send_batch([launch.message for launch in remaining])
            except QueueUnavailable as e:
                if time.monotonic() + delay > deadline:
                    failed.update((launch.key, str(e)) for launch in remaining)
                    break
                log.warning("SQS unreachable; retrying in %.1f s: %s", delay, e)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            again = []
            for launch, outcome in zip(remaining, outcomes, strict=True):
                if outcome.message_id is not None:
                    sent[launch.key] = outcome.message_id
                elif outcome.retryable and time.monotonic() + delay <= deadline:
                    again.append(launch)
                else:
                    failed[launch.key] = outcome.error or "refused"
            remaining = again
            if remaining:
                log.warning("SQS refused %d messages for now; sending again", len(remaining))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        return sent, failed

    def _launch_event(
        self, launch: PendingLaunch, message_id: str | None, error: str | None
    ) -> None:
        """STEP_WORKER_STARTING for a step sent; an engine event for one that was not."""
        if message_id is not None:
            self._queued_event(launch, message_id)
            return
        DagsterEvent.engine_event(
            launch.step_context,
            f'Step "{launch.step_key}" could not be queued: {error or "not sent"}. Its '
            "ledger record says so, and its next health check fails it.",
            EngineEventData(),
        )

    def discard_launch(self, key: str) -> bool:
        """Forget a step put aside and not recorded yet (the run is being terminated)."""
        kept = [launch for launch in self._pending if launch.key != key]
        dropped = len(kept) != len(self._pending)
        self._pending = kept
        return dropped

    def close_launches(self) -> None:
        """The run is over: forget what was not recorded, let the sends in flight end
        (each is recorded in the ledger, which judges it), stop the sending threads."""
        self._pending = []
        self._sending = []
        self._inserted = set()
        if self._senders is not None:
            self._senders.shutdown(wait=True)
            self._senders = None

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

    def pass_ended(self) -> None:
        """A pass of Dagster's loop ended (the executor says so): a health-check round,
        which Dagster makes within one pass, is then served by one snapshot however long
        it takes (10,000 steps in flight: their rows take seconds to read)."""
        self._passes = (self._passes or 0) + 1

    def _health_record(self, key: str, run_id: str) -> StepRecord | None:
        """The ledger record, from a snapshot of the run's records read in this pass of
        Dagster's loop, or at most HEALTH_SNAPSHOT_SECONDS ago. Statuses only move forward,
        and a stale non-terminal one is judged healthy until the next round; a key the
        snapshot lacks is read."""
        snapshot = self._snapshot
        fresh = (
            snapshot is not None
            and snapshot[0] == run_id
            and (
                (self._passes is not None and self._snapshot_pass == self._passes)
                or time.monotonic() - snapshot[1] <= HEALTH_SNAPSHOT_SECONDS
            )
        )
        if snapshot is None or not fresh:
            records = {r.idempotency_key: r for r in self._ledger.for_run(run_id)}
            # Its age counts from when the read ended.
            snapshot = self._snapshot = (run_id, time.monotonic(), records)
            self._snapshot_pass = self._passes
        record = snapshot[2].get(key)
        return record if record is not None else self._ledger.get(key)

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        # A step put aside has no ledger row yet: it is sent before anything is judged.
        self.flush_launches()
        try:
            result = self._check_health(step_handler_context)
        except LedgerUnavailable as e:
            return self._ledger_unreachable(step_handler_context, e)
        self._ledger_down_since = None
        return result

    def _ledger_unreachable(
        self, context: StepHandlerContext, error: LedgerUnavailable
    ) -> CheckStepHealthResult:
        """Raised (Dagster logs it and asks again next round) until the ledger has been
        unreachable for longer than a lease and the outage allowance: by then every
        worker has given its step up, since none could renew its lease, and none can
        claim one, so waiting on would be waiting on the database for ever."""
        now = time.monotonic()
        if self._ledger_down_since is None:
            self._ledger_down_since = now
        down = now - self._ledger_down_since
        bound = self._settings.lease_seconds + self._settings.retry_seconds
        if down <= bound:
            raise error
        _, step_key, _ = self._key(context)
        return CheckStepHealthResult.unhealthy(
            f"The ledger has been unreachable for {down:.0f} s, longer than a lease "
            f"({self._settings.lease_seconds} s) and unreachable_retry_seconds "
            f"({self._settings.retry_seconds:.0f} s): no worker can hold step {step_key} or "
            f"record its ending. Check the ledger database. Last error: {error}"
        )

    def _check_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        key, step_key, attempt = self._key(step_handler_context)
        record = self._health_record(key, step_handler_context.execute_step_args.run_id)
        if record is None:
            return CheckStepHealthResult.unhealthy(
                f"No ledger record for {key}: the step was never queued, or its record expired."
            )
        status = record.status
        if status is Status.DEAD_LETTERED:
            if record.presumed_dead_letter:
                return CheckStepHealthResult.unhealthy(
                    (record.error or "").removeprefix(PRESUMED_DEAD_LETTER)
                )
            return CheckStepHealthResult.unhealthy(
                f"Step {step_key} was dead-lettered after {record.deliveries} deliveries: "
                f"{record.error or 'no worker could complete it'}"
            )
        if status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED):
            # The worker writes the step's events before it records completion, so a
            # completed attempt without an ending in the event log never ran to one.
            if self._attempt_ended(step_handler_context, step_key, attempt):
                return CheckStepHealthResult.healthy()
            if status is Status.CANCELLED:
                return CheckStepHealthResult.unhealthy(
                    f"Step {step_key} was cancelled: {record.error or 'before it ended'}"
                )
            return CheckStepHealthResult.unhealthy(
                f"Step {step_key} ended without running: {record.error or status.value}"
            )
        # Non-terminal: healthy until the bound of its state passes (see ``health``).
        rejection = self._rejection(key, record) if status is Status.ENQUEUED else None
        verdict = judge(record, self._settings.bounds, rejection)
        if verdict is None:
            return CheckStepHealthResult.healthy()
        # Closed first, conditionally: a late delivery then finds it terminal and never
        # starts it. If it moved meanwhile (a worker claimed it, the DLQ processor marked
        # it), the next round judges its new state.
        if self._close(record, verdict):
            return CheckStepHealthResult.unhealthy(verdict.reason)
        return CheckStepHealthResult.healthy()

    def _attempt_ended(self, context: StepHandlerContext, step_key: str, attempt: int) -> bool:
        """Whether the event log holds this attempt's ending. One read of the run's endings
        serves the round (the round's ledger rows were read first, and a worker writes a
        step's events before it records its ending there); a step it does not show ended
        is read on its own, once, before it is judged to have ended without running."""
        instance = context.instance
        run_id = context.execute_step_args.run_id
        snapshot = self._snapshot
        if snapshot is not None and snapshot[0] == run_id:
            if self._endings is None or self._endings[0] is not snapshot:
                self._endings = (snapshot, run_endings(instance, run_id))
            endings = self._endings[1]
            if endings is not None and endings.get(step_key, 0) > attempt:
                return True
        return attempt_outcome(instance, run_id, step_key, attempt) is not None

    def _close(self, record: StepRecord, verdict: Verdict) -> bool:
        key, token = record.idempotency_key, record.fencing_token
        if verdict.action is Action.PRESUME_DEAD_LETTERED:
            return self._ledger.presume_dead_lettered(key, token, verdict.reason)
        if verdict.action is Action.CLOSE_CANCEL:
            return self._ledger.close_cancel(key, token, verdict.reason)
        if record.status is Status.RUNNING:
            return self._ledger.abandon(key, verdict.reason, token=token)
        return self._ledger.abandon(key, verdict.reason)

    def _rejection(self, key: str, record: StepRecord) -> Mapping[str, Any] | None:
        """The most rejected message of a queued step: one read per snapshot serves every
        queued step of the run."""
        snapshot = self._snapshot
        if snapshot is None or snapshot[2].get(key) is not record:
            return self._ledger.rejections_of([key]).get(key)
        if self._rejections is None or self._rejections[0] is not snapshot:
            queued = [k for k, r in snapshot[2].items() if r.status is Status.ENQUEUED]
            self._rejections = (snapshot, self._ledger.rejections_of(queued))
        return self._rejections[1].get(key)

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        key, step_key, _ = self._key(step_handler_context)
        if self.discard_launch(key):
            return  # never sent: nothing to cancel
        was = self._ledger.request_cancel(key)
        if was is None:
            return
        yield DagsterEvent.engine_event(
            step_handler_context.get_step_context(step_key),
            message=f"Requested cancellation of step {step_key} ({was.value.lower()}).",
            event_specific_data=EngineEventData(),
        )
