"""Keeps every running step's lease alive, and notices when it is gone.

Each lease is renewed every lease/3, and at least every ``max_interval`` so that a cancel
lands quickly: the ledger lease ``WHERE fencing_token = mine``; the message visibility
(every lease/3 only); and ECS task protection. A
renewal that updates no row means the lease was lost or cancel was requested; the
owner of the lease is told which, and stops the step.

A message is received hidden for a short while (``receive_visibility_seconds``); its
first renewal, a third of that after the claim, hides it for the lease. A step that
ends sooner never pays for that SQS call (most steps of a fan-out), and the claim does
not wait for it.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aws_lambda_powertools import Logger

from dagster_taskiq.ledger import Ledger, LedgerUnavailable, Status
from dagster_taskiq.observability import emit_metric
from dagster_taskiq.queue import QueueUnavailable, SqsQueue
from dagster_taskiq.worker.protection import TaskProtection


class LeaseState(enum.Enum):
    HELD = "held"
    LOST = "lost"  # another delivery may own the step now: stop, record nothing
    CANCEL_REQUESTED = "cancel_requested"  # interrupt the step, then record CANCELLED
    RELEASING = "releasing"  # this worker is shutting down: give the step back


@dataclass
class Lease:
    key: str
    token: int
    queue: SqsQueue  # the queue (or lane) the message came from
    receipt_handle: str
    lease_seconds: int
    on_change: Callable[[Lease], None]
    last_renewed: float = field(default_factory=time.monotonic)
    last_visibility: float = field(default_factory=time.monotonic)
    visibility_extended: bool = False  # still hidden only as long as the receive asked
    state: LeaseState = LeaseState.HELD
    lock: threading.Lock = field(default_factory=threading.Lock)

    def move_to(self, state: LeaseState) -> bool:
        """Leave HELD once; the first reason to stop wins."""
        with self.lock:
            if self.state is not LeaseState.HELD:
                return False
            self.state = state
        self.on_change(self)
        return True


class Heartbeat(threading.Thread):
    def __init__(
        self,
        *,
        ledger: Ledger,
        protection: TaskProtection,
        log: Logger,
        max_interval: float,
        first_renewal_after: float,
    ) -> None:
        super().__init__(name="dagster-taskiq-heartbeat", daemon=True)
        self._ledger = ledger
        self._protection = protection
        self._log = log
        self._max_interval = max_interval
        self._first_renewal_after = first_renewal_after
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.key] = lease

    def remove(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(lease.key, None)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.wait(0.25):
            with self._lock:
                leases = list(self._leases.values())
            now = time.monotonic()
            for lease in leases:
                interval = min(lease.lease_seconds / 3, self._max_interval)
                if not lease.visibility_extended:
                    interval = min(interval, self._first_renewal_after)
                if lease.state is LeaseState.HELD and now - lease.last_renewed >= interval:
                    try:
                        self.beat(lease)
                    except Exception:
                        # Never let one bad renewal stop the others.
                        self._log.exception(
                            "Heartbeat failed", extra={"idempotency_key": lease.key}
                        )
            self._protection.renew()

    def beat(self, lease: Lease) -> None:
        try:
            renewed = self._ledger.heartbeat(lease.key, lease.token, lease.lease_seconds)
        except LedgerUnavailable as e:
            # Past the lease, another worker may already have taken the step over.
            if time.monotonic() - lease.last_renewed > lease.lease_seconds:
                self._lost(lease, f"ledger unreachable for longer than the lease: {e}")
            else:
                self._log.warning(
                    "Heartbeat could not reach the ledger; retrying",
                    extra={"idempotency_key": lease.key, "error": str(e)},
                )
            return
        if not renewed:
            self._why_not_renewed(lease)
            return
        lease.last_renewed = now = time.monotonic()
        # The ledger lease is renewed often so a cancel lands fast; SQS visibility only
        # needs extending every lease/3, which saves most of the SQS calls.
        if lease.visibility_extended and now - lease.last_visibility < lease.lease_seconds / 3:
            return
        try:
            lease.queue.change_visibility(lease.receipt_handle, lease.lease_seconds)
            lease.last_visibility = now
            lease.visibility_extended = True
        except QueueUnavailable as e:
            self._log.warning(
                "Heartbeat could not extend message visibility",
                extra={"idempotency_key": lease.key, "error": str(e)},
            )

    def _why_not_renewed(self, lease: Lease) -> None:
        try:
            record = self._ledger.get(lease.key)
        except LedgerUnavailable as e:
            self._log.warning("Heartbeat lost the ledger", extra={"error": str(e)})
            return
        if (
            record is not None
            and record.fencing_token == lease.token
            and record.status is Status.CANCEL_REQUESTED
        ):
            self._log.info("Cancellation requested", extra={"idempotency_key": lease.key})
            lease.move_to(LeaseState.CANCEL_REQUESTED)
            return
        holder = f"{record.status.value}, token {record.fencing_token}" if record else "no row"
        self._lost(lease, f"lease lost ({holder}; mine was token {lease.token})")

    def _lost(self, lease: Lease, reason: str) -> None:
        self._log.warning(reason, extra={"idempotency_key": lease.key})
        emit_metric("LeasesLost", 1)
        lease.move_to(LeaseState.LOST)
