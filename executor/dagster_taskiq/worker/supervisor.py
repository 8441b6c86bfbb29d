"""The worker supervisor: receives step messages and runs them in warm step processes.

One slot per step process. A receiver thread long-polls SQS for no more messages than
there are idle slots and hands each to a slot; the slot's thread runs the protocol
(decode, claim, execute) with plain blocking calls, and a recorder thread records the
ending (complete, delete) while the slot takes its next message. A heartbeat thread
keeps the leases alive until their endings are recorded. SIGTERM stops receiving, lets
running steps finish within the stop timeout, and gives back the rest so another worker
takes them over at once.

A message is deleted only after its completion was recorded under this worker's fencing
token, or when the ledger says it must never run (already terminal, cancelled). Nothing
else deletes: every other path leaves the message to SQS, to be delivered again or to
reach the dead-letter queue.

What to do at each branch of the protocol is ``decisions``' answer (pure functions, tested
over all their inputs); this module finds the inputs and carries the actions out.
"""

from __future__ import annotations

import functools
import os
import queue as stdlib_queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from types import FrameType

from aws_lambda_powertools import Logger

from dagster_taskiq.core.errors import LedgerUnavailable, MessageRejected, QueueUnavailable
from dagster_taskiq.core.ledger import Claim, Ledger
from dagster_taskiq.core.messages import StepMessage, decode, peek_key, safe_text
from dagster_taskiq.core.observability import MetricUnit, emit_metric, get_logger
from dagster_taskiq.core.retry import Backoff
from dagster_taskiq.core.routing import poll_order
from dagster_taskiq.core.sqs import ReceivedMessage, SqsQueue
from dagster_taskiq.worker.config import STEP_PROCESS_FORK_SERVER, WorkerSettings
from dagster_taskiq.worker.decisions import (
    LEDGER_UNREACHABLE,
    ClaimUnder,
    Complete,
    Delete,
    DeleteReason,
    FinishCancel,
    HandOver,
    Hide,
    HideForClaim,
    Leave,
    MessageCheck,
    Reject,
    Release,
    Run,
    after_check,
    after_claim,
    after_fenced_write,
    after_step,
    claim_visibility,
    on_receipt,
)
from dagster_taskiq.worker.fork_server import ForkServer
from dagster_taskiq.worker.heartbeat import Heartbeat, Lease, LeaseState, lease_within
from dagster_taskiq.worker.protection import ENV_AGENT_URI, TaskProtection
from dagster_taskiq.worker.step_process import StepProcess, StepProcessDied
from dagster_taskiq.worker.tasks import StepResult, StepTask

# The longest a step's ending waits for its slot to hand over the next step. Recording
# it (a ledger write and an SQS delete) competes with the hand-over's receive and claim,
# which the next step waits for; the ending waits for nothing but its lease.
HAND_OVER_FIRST_SECONDS = 0.05
# What a log line keeps of a value taken from a message (or an error quoting one).
LOG_TEXT_CHARS = 1000


class Slot:
    """One step process and the thread that feeds it."""

    def __init__(self, index: int, worker: Worker) -> None:
        self.index = index
        self.worker = worker
        self.inbox: stdlib_queue.Queue[ReceivedMessage | None] = stdlib_queue.Queue()
        self.process: StepProcess | None = None
        self.lease: Lease | None = None  # of the step its process runs now
        self.recording: Future[None] | None = None  # of its last step's ending
        self.hand_over: threading.Event | None = None  # set: that ending may be recorded
        self.busy = False
        self.thread = threading.Thread(target=self._loop, name=f"slot-{index}", daemon=True)

    # -- the slot thread -----------------------------------------------------------------

    def _loop(self) -> None:
        self._ensure_process()
        self.worker.slot_idle(self)
        while True:
            received = self.inbox.get()
            if received is None:
                break
            self.busy = True
            hand_over = self.hand_over
            try:
                self.worker.handle(self, received)
            except Exception:
                self.worker.log.exception("Unexpected error handling a message; it stays queued")
            finally:
                self.busy = False
                if hand_over is not None:
                    hand_over.set()  # when the message started no step
            if not self.worker.stopping.is_set():
                self._ensure_process()
                self.worker.slot_idle(self)
        if self.process is not None:
            self.process.stop()

    def _ensure_process(self) -> None:
        settings = self.worker.settings
        reason = "first"
        if self.process is not None and (
            not self.process.alive or self.process.steps_run >= settings.max_steps_per_process
        ):
            reason = "replaced" if not self.process.alive else "recycled"
            self.process.stop()  # recycled to bound memory, or dead
            self.process = None
        backoff = Backoff()
        while self.process is None and not self.worker.stopping.is_set():
            try:
                self.process = StepProcess.start(
                    settings.code_locations, fork_server=self.worker.fork_server
                )
            except (StepProcessDied, OSError) as e:
                self.worker.log.error("Could not start a step process", extra={"error": str(e)})
                backoff.wait(self.worker.stopping)
            else:
                self.worker.step_process_ready(self.process, reason)

    def handed_over(self) -> None:
        """The next step is on its way to the process: the last ending may be recorded."""
        if self.hand_over is not None:
            self.hand_over.set()

    # -- called from other threads -------------------------------------------------------

    def on_lease_change(self, lease: Lease) -> None:
        process = self.process
        if process is None or self.lease is not lease:
            return  # the step ended: its process may be running the next one
        if lease.state is LeaseState.CANCEL_REQUESTED:
            process.interrupt()
            threading.Timer(self.worker.settings.cancel_grace, self._kill_if_still, [lease]).start()
        else:  # LOST or RELEASING: stop without writing an ending for this attempt
            process.kill()

    def _kill_if_still(self, lease: Lease) -> None:
        if self.lease is lease and self.process is not None:
            self.process.kill()


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        queues: Mapping[str, SqsQueue],
        ledger: Ledger,
        log: Logger | None = None,
        protection: TaskProtection | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        """``queues`` (by URL) and ``ledger`` are what the worker talks to. The log, ECS
        task protection and the heartbeat are made from the settings unless given."""
        self.settings = settings
        missing = set(settings.all_queue_urls) - set(queues)
        if missing:
            raise ValueError(f"no SqsQueue for {sorted(missing)}")
        self.queues = dict(queues)  # by URL
        self.ledger = ledger
        if log is None:
            log = get_logger("dagster-taskiq-worker")
            log.append_keys(worker_id=settings.worker_id)
        self.log = log
        self.stopping = threading.Event()  # no new messages
        if protection is None:
            protection = TaskProtection(os.environ.get(ENV_AGENT_URI) or None, self.log)
        self.protection = protection
        if heartbeat is None:
            heartbeat = Heartbeat(
                ledger=ledger,
                protection=protection,
                log=self.log,
                max_interval=settings.max_heartbeat_interval,
                first_renewal_after=settings.receive_visibility_seconds / 3,
            )
        self.heartbeat = heartbeat
        self.slots = [Slot(i, self) for i in range(settings.concurrency)]
        self._idle: stdlib_queue.Queue[Slot] = stdlib_queue.Queue()
        self._recorder = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="recorder")
        self.fork_server = (
            ForkServer(settings.code_locations)
            if settings.step_process_start == STEP_PROCESS_FORK_SERVER
            else None
        )
        self._spawn_told = False

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.log.info(
            "Worker starting",
            extra={
                "queue_urls": list(self.settings.queue_urls),
                "priority_queue_urls": list(self.settings.priority_queue_urls),
                "concurrency": self.settings.concurrency,
                "code_locations": [c.target for c in self.settings.code_locations],
                "signed_messages_only": bool(self.settings.signing_key),
                "task_protection": self.protection.enabled,
            },
        )
        if not self._wait_for_ledger():
            return 0
        for slot in self.slots:
            slot.thread.start()
        self.heartbeat.start()
        receiver = threading.Thread(target=self._receive_loop, name="receiver", daemon=True)
        receiver.start()
        self.stopping.wait()
        self._drain()
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping.is_set():
            self.log.info("Stopping: no new steps", extra={"signal": signal.Signals(signum).name})
        self.stopping.set()

    def _wait_for_ledger(self) -> bool:
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                self._ensure_schema()
                return True
            except LedgerUnavailable as e:
                delay = backoff.next
                self.log.error(
                    f"Ledger unreachable; retrying in {delay:.0f} s", extra={"error": str(e)}
                )
                backoff.wait(self.stopping)
        return False

    def _ensure_schema(self) -> None:
        """Refuse a newer ledger schema; bring an older one up. Alembic (11 MB) is imported
        only to upgrade, which a worker of a new release does once, not for every check."""
        if self.ledger.schema_state().needs_upgrade:
            from dagster_taskiq.core.migrations import ensure_schema

            ensure_schema(self.ledger, component="worker")
        else:
            self.ledger.check_schema(component="worker")

    def _drain(self) -> None:
        deadline = time.monotonic() + self.settings.stop_timeout
        while any(s.busy for s in self.slots) and time.monotonic() < deadline:
            time.sleep(0.2)
        for slot in self.slots:
            lease = slot.lease
            if slot.busy and lease is not None:
                self.log.info("Releasing a running step", extra={"idempotency_key": lease.key})
                lease.move_to(LeaseState.RELEASING)
        for slot in self.slots:
            slot.inbox.put(None)
        for slot in self.slots:
            if slot.thread.is_alive():
                slot.thread.join(30)
        recordings = [s.recording for s in self.slots if s.recording is not None]
        wait_for_futures(recordings, timeout=30)
        self._recorder.shutdown(wait=False)
        self.heartbeat.stop()
        if self.fork_server is not None:
            self.fork_server.stop()
        self.log.info("Worker stopped")

    def step_process_ready(self, process: StepProcess, reason: str) -> None:
        fork_server = self.fork_server
        if fork_server is not None and fork_server.refusal and not self._spawn_told:
            self._spawn_told = True
            self.log.warning(
                "Step processes are spawned, not forked", extra={"reason": fork_server.refusal}
            )
        self.log.info(
            "Step process ready",
            extra={
                "pid": process.pid,
                "start": reason,  # first, recycled or replaced
                "started_by": process.started_by,
                "ready_ms": round(process.ready_seconds * 1000, 1),
            },
        )

    # -- receiving -----------------------------------------------------------------------

    def slot_idle(self, slot: Slot) -> None:
        self._idle.put(slot)

    def _receive_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._receive_forever()
            except Exception:
                self.log.exception("Receiver failed; restarting it")
                self.stopping.wait(1)

    def _receive_forever(self) -> None:
        backoff = Backoff()
        round_number = 0
        while not self.stopping.is_set():
            try:
                first = self._idle.get(timeout=0.5)
            except stdlib_queue.Empty:
                continue
            idle = [first]
            while True:
                try:
                    idle.append(self._idle.get_nowait())
                except stdlib_queue.Empty:
                    break
            order = poll_order(
                self.settings.priority_queue_urls,
                self.settings.queue_urls,
                round_number,
                self.settings.priority_ratio,
            )
            round_number += 1
            try:
                messages = self._receive(order, len(idle))
                backoff.reset()
            except QueueUnavailable as e:
                self.log.error(
                    f"SQS unreachable; retrying in {backoff.next:.0f} s", extra={"error": str(e)}
                )
                messages = []
                backoff.wait(self.stopping)
            for received in messages:
                match on_receipt(stopping=self.stopping.is_set()):
                    case HandOver():
                        idle.pop().inbox.put(received)
                    case Hide(seconds=seconds):
                        self._give_back(received, seconds)
            for slot in idle:
                self._idle.put(slot)

    def _receive(self, order: list[str], wanted: int) -> list[ReceivedMessage]:
        """At most ``wanted`` messages, from the queues in ``order``.

        One queue: a long poll. Several: an immediate receive from each in turn, and when
        all are empty a short long-poll of each, so that an idle worker answers any of
        them within about ``multi_queue_wait_seconds`` per queue.
        """
        visibility = self.settings.receive_visibility_seconds
        if len(order) == 1:
            return self.queues[order[0]].receive(
                max_messages=wanted,
                wait_seconds=self.settings.wait_seconds,
                visibility_timeout=visibility,
            )
        wait = min(self.settings.wait_seconds, self.settings.multi_queue_wait_seconds)
        messages: list[ReceivedMessage] = []
        for wait_seconds in (0, wait):
            for url in order:
                if len(messages) >= wanted or self.stopping.is_set():
                    return messages
                try:
                    messages += self.queues[url].receive(
                        max_messages=wanted - len(messages),
                        wait_seconds=wait_seconds,
                        visibility_timeout=visibility,
                    )
                except QueueUnavailable:
                    if not messages:
                        raise
                    return messages  # run what arrived; the next round reports the fault
            if messages:
                break
        return messages

    def _queue_of(self, received: ReceivedMessage) -> SqsQueue:
        return self.queues[received.queue_url]

    def _give_back(self, received: ReceivedMessage, seconds: int) -> None:
        try:
            self._queue_of(received).change_visibility(received.receipt_handle, seconds)
        except QueueUnavailable as e:
            self.log.warning("Could not give a message back", extra={"error": str(e)})

    # -- the protocol, on a slot's thread ------------------------------------------------

    def handle(self, slot: Slot, received: ReceivedMessage) -> None:
        message: StepMessage | None = None
        try:
            message = decode(
                received.body,
                signing_key=self.settings.signing_key,
                max_bytes=self.settings.max_message_bytes,
                max_step_args_bytes=self.settings.max_step_args_bytes,
            )
        except MessageRejected as e:
            check = MessageCheck.undecodable(e.reason, e.detail)
        else:
            check = self._vet(slot, message)
        action = after_check(check)
        if isinstance(action, Hide | Reject):
            self._hide_or_reject(received, action)
        elif message is not None:  # decoded and vetted: claimed
            self._claim(slot, received, message, check)

    def _vet(self, slot: Slot, message: StepMessage) -> MessageCheck:
        # The step process reads the step arguments: this process does not import Dagster.
        try:
            if slot.process is None:
                raise StepProcessDied(None)
            return MessageCheck.vetted(slot.process.vet(message))
        except StepProcessDied as e:
            self.log.error("Could not read the step arguments", extra={"error": str(e)})
            return MessageCheck.unread(str(e))

    def _claim(
        self, slot: Slot, received: ReceivedMessage, message: StepMessage, check: MessageCheck
    ) -> None:
        hidden_until = self._hidden_for_claim(received, message)
        if hidden_until is None:
            return
        lease_seconds = lease_within(hidden_until, message.lease_seconds, time.monotonic())
        try:
            claim = self.ledger.claim(
                message.idempotency_key,
                worker_id=self.settings.worker_id,
                lease_seconds=lease_seconds,
                payload_hash=message.payload_hash,
                deliveries=received.receive_count,
            )
        except LedgerUnavailable as e:
            self.log.error("Ledger unreachable; the message stays queued", extra={"error": str(e)})
            self._hide_or_reject(received, after_claim(LEDGER_UNREACHABLE, refusal=check.refusal))
            return

        action = after_claim(claim, refusal=check.refusal)
        match action:
            case Run():
                self._run(
                    slot,
                    message,
                    claim,
                    received,
                    hidden_until=hidden_until,
                    lease_seconds=lease_seconds,
                )
            case Complete() as completion:  # refused: recorded as the step's failure
                self._complete(message.idempotency_key, claim.fencing_token, received, completion)
            case Delete(reason=reason):
                keys = self._keys(message, claim)
                if reason is DeleteReason.DUPLICATE:
                    emit_metric("DuplicatesSuppressed", 1)
                    self.log.info("Duplicate delivery suppressed", extra=keys)
                else:
                    self.log.info("Cancelled before it started", extra=keys)
                self._delete(received)
            case Hide() | Reject():
                self._hide_or_reject(received, action)

    def _hidden_for_claim(self, received: ReceivedMessage, message: StepMessage) -> float | None:
        """Until when the message is surely hidden, for a claim's lease to end before it
        (``decisions.claim_visibility``). None: it could not be hidden, and is left to SQS
        unclaimed."""
        match claim_visibility(received.hidden_until, message.lease_seconds, time.monotonic()):
            case ClaimUnder(hidden_until=hidden_until):
                return hidden_until
            case HideForClaim(seconds=seconds, hidden_until=hidden_until):
                try:
                    self._queue_of(received).change_visibility(received.receipt_handle, seconds)
                except QueueUnavailable as e:
                    self.log.warning(
                        "Could not hide a message for its claim; it stays queued",
                        extra={"error": str(e), "message_id": received.message_id},
                    )
                    return None
                return hidden_until

    def _hide_or_reject(self, received: ReceivedMessage, action: Hide | Reject) -> None:
        match action:
            case Reject(reason=reason, detail=detail):
                self._reject(received, reason, detail)
            case Hide(seconds=seconds, pause_seconds=pause_seconds):
                self._hide(received, seconds)
                if pause_seconds:
                    self.stopping.wait(pause_seconds)

    def _run(
        self,
        slot: Slot,
        message: StepMessage,
        claim: Claim,
        received: ReceivedMessage,
        *,
        hidden_until: float,
        lease_seconds: float,
    ) -> None:
        token = claim.fencing_token
        lease = Lease(
            key=message.idempotency_key,
            token=token,
            queue=self._queue_of(received),
            receipt_handle=received.receipt_handle,
            lease_seconds=message.lease_seconds,
            on_change=slot.on_lease_change,
            hidden_until=hidden_until,
            granted_seconds=lease_seconds,
        )
        slot.lease = lease
        self.heartbeat.add(lease)
        self.protection.step_started()
        handed_over = False
        try:
            keys = self._keys(message, claim)
            if claim.is_takeover:
                self.log.info("Taking over a step whose worker lost its lease", extra=keys)
            emit_metric("StepsStarted", 1)
            self.log.info("Step started", extra=keys)
            task = StepTask(
                message=message,
                fencing_token=token,
                worker_id=self.settings.worker_id,
                delivery=received.receive_count,
                previous_worker=claim.previous_worker if claim.is_takeover else None,
            )
            result: StepResult | None = None
            failure: str | None = None
            try:
                if slot.process is None:
                    raise StepProcessDied(None)
                slot.handed_over()
                result = slot.process.run(task)
            except StepProcessDied as e:
                failure = f"step process died: {e}"
            except Exception as e:
                # A fault on this side: give the step back rather than hold it.
                self.log.exception("Could not run the step here", extra=keys)
                failure = f"worker error: {e}"
            # The step process is free: the slot takes its next message while the
            # recorder records this ending, as soon as the next step is handed over (or
            # after HAND_OVER_FIRST_SECONDS). One ending per slot waits at most.
            slot.lease = None
            if slot.recording is not None:
                slot.recording.result()
            slot.hand_over = hand_over = threading.Event()
            finish = functools.partial(
                self._finish,
                message=message,
                token=token,
                received=received,
                lease=lease,
                result=result,
                failure=failure,
            )
            slot.recording = self._recorder.submit(self._record, lease, finish, hand_over)
            handed_over = True
        finally:
            slot.lease = None
            if not handed_over:
                self._end_lease(lease)

    def _record(self, lease: Lease, finish: Callable[[], None], hand_over: threading.Event) -> None:
        """On a recorder thread, once the slot has handed over its next step (or after
        HAND_OVER_FIRST_SECONDS); the lease is kept alive until the ending is recorded."""
        hand_over.wait(HAND_OVER_FIRST_SECONDS)
        try:
            finish()
        except Exception:
            # The message stays queued: SQS delivers it again and the ledger decides.
            self.log.exception(
                "Could not record a step's ending", extra={"idempotency_key": lease.key}
            )
        finally:
            self._end_lease(lease)

    def _end_lease(self, lease: Lease) -> None:
        self.heartbeat.remove(lease)
        self.protection.step_finished()

    def _finish(
        self,
        *,
        message: StepMessage,
        token: int,
        received: ReceivedMessage,
        lease: Lease,
        result: StepResult | None,
        failure: str | None,
    ) -> None:
        key = message.idempotency_key
        # The lease's state is read once: the heartbeat may change it meanwhile.
        match after_step(lease.state, result, failure):
            case Leave():
                # Someone else may hold the step now; record nothing, delete nothing.
                self.log.warning("Step stopped: lease lost", extra={"idempotency_key": key})
            case Release(reason=reason, hide_seconds=hide_seconds):
                self.log.warning(
                    "Step given back to the queue", extra={"idempotency_key": key, "reason": reason}
                )
                self._retrying(lambda: self.ledger.release(key, token, reason), lease)
                self._hide(received, hide_seconds)
            case FinishCancel(detail=detail):
                cancelled = self._retrying(lambda: self.ledger.finish_cancel(key, token), lease)
                if isinstance(after_fenced_write(updated=cancelled), Delete):
                    self._delete(received)
                self.log.info("Step cancelled", extra={"idempotency_key": key, "detail": detail})
            case Complete() as completion:
                if completion.duplicate:
                    emit_metric("DuplicatesSuppressed", 1)
                self._complete(key, token, received, completion, lease=lease)
                if result is not None:  # always: only a step's own result completes it
                    self._step_finished(key, result)

    def _step_finished(self, key: str, result: StepResult) -> None:
        emit_metric("StepsSucceeded" if result.succeeded else "StepsFailed", 1)
        emit_metric("StepDuration", result.seconds, MetricUnit.Seconds)
        self.log.info(
            "Step finished",
            extra={
                "idempotency_key": key,
                "outcome": result.outcome.value,
                "seconds": round(result.seconds, 3),
                "detail": result.detail,
            },
        )

    def _complete(
        self,
        key: str,
        token: int,
        received: ReceivedMessage,
        completion: Complete,
        *,
        lease: Lease | None = None,
    ) -> None:
        recorded = self._retrying(
            lambda: self.ledger.complete(
                key,
                token,
                succeeded=completion.succeeded,
                error=completion.error,
                duplicate=completion.duplicate,
            ),
            lease,
        )
        match after_fenced_write(updated=recorded):
            case Delete():
                self._delete(received)
            case Leave():
                self.log.warning(
                    "Completion not recorded: this worker no longer holds the step",
                    extra={"idempotency_key": key, "token": token},
                )

    def _retrying(self, action: Callable[[], bool], lease: Lease | None) -> bool:
        """Run a ledger write, retrying through an outage while the lease can still hold."""
        backoff = Backoff(0.5, 5.0)
        deadline = time.monotonic() + (lease.lease_seconds if lease else 30)
        while True:
            try:
                return action()
            except LedgerUnavailable as e:
                if time.monotonic() + backoff.next > deadline:
                    self.log.error(
                        "Ledger unreachable; giving up, SQS will redeliver", extra={"error": str(e)}
                    )
                    return False
                self.log.warning("Ledger unreachable; retrying", extra={"error": str(e)})
                # Not cut short by shutdown: a drain still wants its completions recorded.
                backoff.wait()

    def _delete(self, received: ReceivedMessage) -> None:
        for attempt in range(3):
            try:
                self._queue_of(received).delete(received.receipt_handle)
                return
            except QueueUnavailable as e:
                self.log.warning("Delete failed", extra={"error": str(e), "try": attempt + 1})
                time.sleep(1 + attempt)
        # Redelivered later and suppressed as a duplicate: safe, only wasteful.

    def _hide(self, received: ReceivedMessage, seconds: int) -> None:
        try:
            self._queue_of(received).change_visibility(received.receipt_handle, seconds)
        except QueueUnavailable as e:
            self.log.warning("Could not change message visibility", extra={"error": str(e)})

    def _reject(self, received: ReceivedMessage, reason: str, detail: str) -> None:
        """Never executed: recorded, then left to SQS to redeliver until it dead-letters."""
        emit_metric("MessagesRejected", 1, reason=reason)
        facts = {
            "message_id": safe_text(received.message_id, LOG_TEXT_CHARS),
            "reason": reason,
            "detail": safe_text(detail, LOG_TEXT_CHARS),
        }
        self.log.error("Message rejected", extra=facts)
        try:
            self.ledger.record_rejection(
                message_id=received.message_id,
                reason=reason,
                detail=detail,
                body=received.body,
                worker_id=self.settings.worker_id,
                idempotency_key=peek_key(received.body),
            )
        except Exception as e:
            # Whatever failed, the rejection is in the log and the message stays with SQS,
            # which dead-letters it in the end: nothing is lost, nothing runs.
            self.log.error(
                "Could not record the rejection; the message is left to SQS",
                extra={**facts, "error": safe_text(f"{type(e).__name__}: {e}", LOG_TEXT_CHARS)},
            )
        self._hide(received, 0)

    @staticmethod
    def _keys(message: StepMessage, claim: Claim) -> dict[str, object]:
        # Decoded fields are valid text, but may be as long as the message: bounded.
        return {
            "idempotency_key": safe_text(message.idempotency_key, LOG_TEXT_CHARS),
            "run_id": safe_text(message.run_id, LOG_TEXT_CHARS),
            "step_key": safe_text(message.step_key, LOG_TEXT_CHARS),
            "attempt": message.attempt,
            "fencing_token": claim.fencing_token,
            "previous_worker": claim.previous_worker,
        }
