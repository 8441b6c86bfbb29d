"""Every ledger lease a worker writes ends before its message may be seen again."""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools import Logger
from hypothesis import given
from hypothesis import strategies as st

from dagster_taskiq.core.errors import QueueUnavailable
from dagster_taskiq.worker.heartbeat import (
    VISIBILITY_MARGIN,
    Heartbeat,
    Lease,
    lease_within,
)
from dagster_taskiq.worker.protection import TaskProtection


@given(
    hidden_for=st.floats(-100, 50_000, allow_nan=False),
    lease=st.integers(1, 43_000),
)
def test_a_granted_lease_never_outlives_the_visibility(hidden_for: float, lease: int) -> None:
    now = 1000.0
    granted = lease_within(now + hidden_for, lease, now)
    assert 0 <= granted <= lease
    assert now + granted <= max(now, now + hidden_for - VISIBILITY_MARGIN)
    if hidden_for >= lease + VISIBILITY_MARGIN:
        assert granted == lease


class Calls:
    def __init__(self, *, sqs_fails: bool = False) -> None:
        self.log: list[tuple[str, Any]] = []
        self.sqs_fails = sqs_fails

    # the queue
    def change_visibility(self, receipt_handle: str, seconds: int) -> None:
        if self.sqs_fails:
            raise QueueUnavailable("SQS is unreachable")
        self.log.append(("visibility", seconds))

    # the ledger
    def heartbeat(self, key: str, token: int, lease_seconds: float) -> bool:
        self.log.append(("lease", lease_seconds))
        return True


def heartbeat_on(calls: Calls) -> Heartbeat:
    log = Logger(service="test")
    return Heartbeat(
        ledger=calls,  # type: ignore[arg-type]
        protection=TaskProtection(None, log),
        log=log,
        max_interval=10,
        first_renewal_after=5,
    )


def lease_on(calls: Calls, *, hidden_for: float, lease_seconds: int = 300) -> Lease:
    now = time.monotonic()
    return Lease(
        "run:step:0",
        1,
        calls,  # type: ignore[arg-type]
        "handle",
        lease_seconds,
        on_change=lambda _: None,
        hidden_until=now + hidden_for,
        granted_seconds=lease_within(now + hidden_for, lease_seconds, now),
    )


def test_the_first_beat_hides_the_message_before_it_renews_the_lease() -> None:
    calls = Calls()
    lease = lease_on(calls, hidden_for=15)
    assert lease.granted_seconds <= 15 - VISIBILITY_MARGIN
    heartbeat_on(calls).beat(lease)
    (visibility, hidden), (renewal, granted) = calls.log
    assert (visibility, renewal) == ("visibility", "lease")
    assert hidden >= 300 + VISIBILITY_MARGIN
    assert granted > 299.9, "the whole lease, less the moments the calls took"


def test_between_extensions_the_lease_stops_at_the_visibility() -> None:
    calls = Calls()
    lease = lease_on(calls, hidden_for=15)
    beat = heartbeat_on(calls)
    beat.beat(lease)
    # 90 s later (ledger renewals every 10 s, visibility only every 100 s).
    lease.hidden_until -= 90
    lease.last_visibility -= 90
    calls.log.clear()
    beat.beat(lease)
    ((renewal, granted),) = calls.log
    assert renewal == "lease"
    assert granted <= 300 + VISIBILITY_MARGIN - 90 - VISIBILITY_MARGIN


def test_a_lease_whose_message_cannot_be_hidden_runs_out_with_the_visibility() -> None:
    calls = Calls(sqs_fails=True)
    lease = lease_on(calls, hidden_for=4)
    heartbeat_on(calls).beat(lease)
    ((renewal, granted),) = calls.log
    assert renewal == "lease"
    assert granted <= 4 - VISIBILITY_MARGIN
    assert lease.beat_interval(10, 5) >= 0.5, "no tight loop while SQS is away"
