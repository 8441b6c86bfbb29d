"""Keeps every running step's lease alive, and notices when it is gone.

The invariant this module keeps: **while a ledger lease is live, its message stays
hidden at least as long.** A worker that dies (the whole task, supervisor and step
processes together) leaves a message that becomes visible a moment after its lease
expires, never before, so the next delivery takes the step over at once: one death
costs one receive of the step's delivery budget, never two (a receive that finds a live
lease is spent for nothing).

So every ledger lease this worker writes ends ``VISIBILITY_MARGIN`` before the time the
message is known to stay hidden (``Lease.hidden_until``, see ``lease_within``), and each
beat first extends the message's visibility when it is due (every lease/3), then renews
the ledger lease ``WHERE fencing_token = mine`` up to that horizon, and ECS task
protection. A renewal that updates no row means the lease was lost or cancel was
requested; the owner of the lease is told which, and stops the step. Ledger renewals
run at least every ``max_interval`` so that a cancel lands quickly.

A message is received hidden for a short while (``receive_visibility_seconds``), and
the claim's lease is capped by it; the first beat, about a third of that after the
claim, hides the message for the full lease. A step that ends sooner never pays for
that SQS call (most steps of a fan-out), and the claim does not wait for it.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aws_lambda_powertools import Logger

from dagster_taskiq.core.errors import LedgerUnavailable, QueueUnavailable
from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.core.observability import emit_metric
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.worker.protection import TaskProtection

# A message stays hidden at least this much longer than the ledger lease that holds it.
# It covers the time between the SQS call that hides the message (or the receive's
# answer) and the ledger statement that sets the lease, both made in that order.
VISIBILITY_MARGIN = 2.0
# The shortest beat interval, so that a lease that cannot be renewed for long (SQS
# unreachable) is not retried in a tight loop.
MIN_BEAT_INTERVAL = 0.5


def lease_within(hidden_until: float, lease_seconds: float, now: float) -> float:
    """The ledger lease that may be granted at ``now`` (monotonic) for a message hidden
    until ``hidden_until``: the full ``lease_seconds`` at most, and never past the
    visibility less ``VISIBILITY_MARGIN``. 0 when the message may be visible already:
    the lease then expires at once, and the next delivery may take the step."""
    return max(0.0, min(float(lease_seconds), hidden_until - now - VISIBILITY_MARGIN))


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
    # When the message may become visible again (time.monotonic()); every ledger lease
    # ends before it. The receive's (or the claim's) value until the first extension.
    hidden_until: float = 0.0
    # Seconds of ledger lease granted at ``last_renewed``: the claim's, then each beat's.
    granted_seconds: float = 0.0
    last_renewed: float = field(default_factory=time.monotonic)
    last_visibility: float = field(default_factory=time.monotonic)
    visibility_extended: bool = False  # still hidden only as long as the receive asked
    state: LeaseState = LeaseState.HELD
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not self.granted_seconds:
            self.granted_seconds = float(self.lease_seconds)
        if not self.hidden_until:
            # Unknown (a caller that did not say): as if hidden for the lease from now.
            self.hidden_until = self.last_renewed + self.lease_seconds + VISIBILITY_MARGIN

    def beat_interval(self, max_interval: float, first_renewal_after: float) -> float:
        """Seconds between renewals: a third of the lease (and of what was granted last,
        which the receive's visibility may have cut short), at least every
        ``max_interval``, and the first one after ``first_renewal_after`` at most."""
        interval = min(self.lease_seconds / 3, self.granted_seconds / 3, max_interval)
        if not self.visibility_extended:
            interval = min(interval, first_renewal_after)
        return max(MIN_BEAT_INTERVAL, interval)

    def visibility_due(self, now: float) -> bool:
        return not self.visibility_extended or now - self.last_visibility >= self.lease_seconds / 3

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
                interval = lease.beat_interval(self._max_interval, self._first_renewal_after)
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
        # Visibility first: the ledger lease below may then reach the new horizon.
        if lease.visibility_due(time.monotonic()):
            self._extend_visibility(lease)
        started = time.monotonic()
        seconds = lease_within(lease.hidden_until, lease.lease_seconds, started)
        try:
            renewed = self._ledger.heartbeat(lease.key, lease.token, seconds)
        except LedgerUnavailable as e:
            # Past the lease, another worker may already have taken the step over.
            if time.monotonic() - lease.last_renewed > lease.granted_seconds:
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
        lease.last_renewed, lease.granted_seconds = started, seconds
        # Between extensions the lease stays at least 2/3 of its length; below half, the
        # extensions have been failing and the step will soon be taken over elsewhere.
        if seconds < lease.lease_seconds / 2 and lease.visibility_extended:
            self._log.warning(
                "Lease renewed short: the message could not be kept hidden longer",
                extra={"idempotency_key": lease.key, "lease_seconds": round(seconds, 1)},
            )

    def _extend_visibility(self, lease: Lease) -> None:
        """Hide the message for the lease and the margin. The timeout runs from SQS's
        handling of the call, after ``asked``: ``hidden_until`` errs early, as it must."""
        asked = time.monotonic()
        seconds = math.ceil(lease.lease_seconds + VISIBILITY_MARGIN)
        try:
            lease.queue.change_visibility(lease.receipt_handle, seconds)
        except QueueUnavailable as e:
            # The ledger lease stops short of the old horizon meanwhile, so that the
            # message becomes visible only after the lease has expired.
            self._log.warning(
                "Heartbeat could not extend message visibility",
                extra={"idempotency_key": lease.key, "error": str(e)},
            )
            return
        lease.hidden_until = asked + seconds
        lease.last_visibility = asked
        lease.visibility_extended = True

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
