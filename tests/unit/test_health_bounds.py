"""Every non-terminal ledger state has a bound, and no bound fires on a step that can run."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dagster_taskiq.core.errors import LedgerUnavailable
from dagster_taskiq.core.health import (
    CANCEL_GRACE_SECONDS,
    RECEIVE_WAIT_SECONDS,
    VISIBILITY_MARGIN_SECONDS,
    Action,
    HealthBounds,
    dead_letter_grace,
    judge,
)
from dagster_taskiq.core.ledger import NON_TERMINAL, Status, StepRecord
from dagster_taskiq.core.routing import QueueRoute, Routing
from dagster_taskiq.executor.step_handler import LaunchSettings, SqsStepHandler

BUDGET = 3
RETENTION = 3_600
BOUNDS = HealthBounds(max_receive_count=BUDGET, message_retention=RETENTION)
GRACE = dead_letter_grace(BOUNDS.dead_letter_timeout)
QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/steps"


def record(
    status: Status,
    *,
    deliveries: int = 1,
    age: float = 10.0,
    expired: float | None = None,  # seconds since the lease expired; negative: live
    idle: float = 0.0,
    error: str | None = None,
) -> StepRecord:
    return StepRecord(
        idempotency_key="run:op:0",
        run_id="run",
        step_key="op",
        attempt=0,
        queue_url=QUEUE,
        status=status,
        worker_id="worker-1" if expired is not None else None,
        fencing_token=deliveries,
        lease_expires_at=datetime.now(UTC) if expired is not None else None,
        lease_live=status is Status.RUNNING and expired is not None and expired < 0,
        deliveries=deliveries,
        duplicates_suppressed=0,
        payload_hash="h",
        error=error,
        enqueued_at=datetime.now(UTC),
        started_at=None,
        finished_at=None,
        age_seconds=age,
        lease_expired_seconds=expired,
        idle_seconds=idle,
    )


def rejection(count: int, reason: str = "forged") -> dict[str, Any]:
    return {
        "message_id": "m-1",
        "reason": reason,
        "detail": "the signature does not verify",
        "receive_count": count,
    }


# -- the derivation ------------------------------------------------------------------------


def test_the_dead_letter_grace_covers_visibility_a_receive_and_the_processor() -> None:
    assert dead_letter_grace(60) == VISIBILITY_MARGIN_SECONDS + RECEIVE_WAIT_SECONDS + 60
    assert dead_letter_grace(0) == VISIBILITY_MARGIN_SECONDS + RECEIVE_WAIT_SECONDS
    # A negative setting never makes the executor outrun the queue.
    assert dead_letter_grace(-5) == dead_letter_grace(0)
    # A worker hides a message 2 s past its lease, or 5 s after giving it back.
    assert VISIBILITY_MARGIN_SECONDS >= 5
    assert RECEIVE_WAIT_SECONDS == 20  # SQS's longest receive wait


# -- never on a step that can still run ----------------------------------------------------


@given(
    deliveries=st.integers(0, 50),
    age=st.floats(0, 10 * RETENTION),
    remaining=st.floats(0.001, 10_000),
    idle=st.floats(0, 10 * RETENTION),
)
def test_a_live_lease_is_always_healthy(
    deliveries: int, age: float, remaining: float, idle: float
) -> None:
    for status in (Status.RUNNING, Status.CANCEL_REQUESTED):
        live = record(status, deliveries=deliveries, age=age, expired=-remaining, idle=idle)
        assert judge(live, BOUNDS, rejection(100)) is None


@given(deliveries=st.integers(BUDGET, 50), expired=st.floats(0, GRACE))
def test_a_last_delivery_is_given_the_grace(deliveries: int, expired: float) -> None:
    assert judge(record(Status.RUNNING, deliveries=deliveries, expired=expired), BOUNDS) is None


@given(
    deliveries=st.integers(0, BUDGET - 1),
    expired=st.floats(0, 1e9),
    age=st.floats(0, RETENTION),
)
def test_a_step_with_deliveries_left_waits_for_them_without_a_pickup_timeout(
    deliveries: int, expired: float, age: float
) -> None:
    waiting = record(Status.RUNNING, deliveries=deliveries, expired=expired, age=age)
    assert judge(waiting, BOUNDS) is None


@given(age=st.floats(0, RETENTION), count=st.integers(0, BUDGET - 1))
def test_a_queued_step_waits_within_the_retention(age: float, count: int) -> None:
    queued = record(Status.ENQUEUED, deliveries=0, age=age)
    assert judge(queued, BOUNDS) is None
    assert judge(queued, BOUNDS, rejection(count)) is None


# -- and a bound for every state -----------------------------------------------------------


@pytest.mark.parametrize("status", sorted(NON_TERMINAL))
@pytest.mark.parametrize("deliveries", [0, 1, BUDGET, BUDGET + 1])
def test_no_state_without_a_live_lease_is_healthy_for_ever(status: Status, deliveries: int) -> None:
    forever = 100 * RETENTION
    for expired in (None, forever):
        stuck = record(status, deliveries=deliveries, age=forever, expired=expired, idle=forever)
        assert judge(stuck, BOUNDS) is not None, (status, deliveries, expired)


def test_a_last_delivery_past_the_grace_is_presumed_dead_lettered() -> None:
    dead = record(
        Status.RUNNING, deliveries=BUDGET, expired=GRACE + 1, error="step process died: -9"
    )

    verdict = judge(dead, BOUNDS)

    assert verdict is not None
    assert verdict.action is Action.PRESUME_DEAD_LETTERED
    assert f"used its last of {BUDGET} deliveries" in verdict.reason
    assert f"stopped heartbeating {GRACE + 1:.0f} s ago" in verdict.reason
    assert "step process died: -9" in verdict.reason
    assert "dead-letter queue" in verdict.reason
    assert "check the DLQ processor function, its errors and its event source" in verdict.reason


def test_a_step_given_back_is_bounded_by_the_pickup_timeout_from_its_lease_expiry() -> None:
    bounds = dataclasses.replace(BOUNDS, pickup_timeout=60)
    limit = 60 + VISIBILITY_MARGIN_SECONDS
    # Queued long ago, but given back only now: it waits like a newly queued step.
    assert judge(record(Status.RUNNING, expired=limit, age=1_000), bounds) is None

    verdict = judge(record(Status.RUNNING, expired=limit + 1, age=1_000), bounds)

    assert verdict is not None and verdict.action is Action.ABANDON
    assert "no worker took it again within the pick-up timeout of 60 s" in verdict.reason
    assert QUEUE in verdict.reason


@pytest.mark.parametrize("status", [Status.ENQUEUED, Status.RUNNING])
def test_the_message_retention_bounds_a_step_no_worker_holds(status: Status) -> None:
    limit = BOUNDS.retention_bound
    assert limit > RETENTION
    assert judge(record(status, age=limit, expired=limit), BOUNDS) is None

    verdict = judge(record(status, age=limit + 1, expired=limit + 1), BOUNDS)

    assert verdict is not None and verdict.action is Action.ABANDON
    assert f"message retention of {RETENTION} s" in verdict.reason
    assert "SQS deleted it" in verdict.reason


def test_a_queued_step_past_its_pickup_timeout_is_abandoned() -> None:
    bounds = dataclasses.replace(BOUNDS, pickup_timeout=30)
    assert judge(record(Status.ENQUEUED, age=30), bounds) is None

    verdict = judge(record(Status.ENQUEUED, age=31), bounds)

    assert verdict is not None and verdict.action is Action.ABANDON
    assert "was not picked up by any worker within 30 s" in verdict.reason


def test_a_message_every_delivery_rejected_is_dead_lettered_with_the_reason() -> None:
    queued = record(Status.ENQUEUED, deliveries=0)

    verdict = judge(queued, BOUNDS, rejection(BUDGET))

    assert verdict is not None and verdict.action is Action.PRESUME_DEAD_LETTERED
    assert f"workers rejected its message {BUDGET} times" in verdict.reason
    assert "the signature does not verify" in verdict.reason
    assert "same signing key" in verdict.reason
    assert "m-1" in verdict.reason


def test_a_cancel_nobody_holds_is_closed_after_the_grace() -> None:
    # Requested now, for a step that waited in the queue for an hour.
    fresh = record(Status.CANCEL_REQUESTED, age=3_600, idle=1)
    assert judge(fresh, BOUNDS) is None
    within = record(Status.CANCEL_REQUESTED, expired=CANCEL_GRACE_SECONDS, idle=1_000)
    assert judge(within, BOUNDS) is None

    queued = judge(record(Status.CANCEL_REQUESTED, idle=CANCEL_GRACE_SECONDS + 1), BOUNDS)
    died = judge(record(Status.CANCEL_REQUESTED, expired=1_000, idle=1_000), BOUNDS)

    assert queued is not None and queued.action is Action.CLOSE_CANCEL
    assert "no worker picked it up" in queued.reason
    assert died is not None and died.action is Action.CLOSE_CANCEL
    assert "its worker stopped heartbeating" in died.reason


def test_terminal_states_are_not_judged_here() -> None:
    for status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.DEAD_LETTERED):
        assert judge(record(status, age=1e9, expired=1e9, idle=1e9), BOUNDS) is None


def test_a_long_step_key_is_quoted_bounded() -> None:
    dead = dataclasses.replace(
        record(Status.RUNNING, deliveries=BUDGET, expired=GRACE + 1), step_key="k" * 100_000
    )

    verdict = judge(dead, BOUNDS)

    assert verdict is not None and len(verdict.reason) < 2_000


# -- the ledger itself ----------------------------------------------------------------------


class DownLedger:
    def for_run(self, run_id: str) -> list[StepRecord]:
        raise LedgerUnavailable("connection refused")

    get = for_run


def test_an_unreachable_ledger_is_waited_for_a_lease_and_the_outage_allowance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = LaunchSettings(
        lease_seconds=300,
        idempotency_key_ttl=60,
        max_message_bytes=1000,
        signing_key=None,
        pickup_timeout=None,
        retry_seconds=60,
    )
    handler = SqsStepHandler(
        queues={},
        routing=Routing({"default": QueueRoute("default", QUEUE)}),
        ledger=DownLedger(),  # type: ignore[arg-type]
        settings=settings,
    )
    args = SimpleNamespace(run_id="run", step_keys_to_execute=["op"], known_state=None)
    context: Any = SimpleNamespace(execute_step_args=args)
    clock = [1_000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    for elapsed in (0, 100, 360):
        clock[0] = 1_000.0 + elapsed
        # Dagster logs the error and asks again at the next round.
        with pytest.raises(LedgerUnavailable):
            handler.check_step_health(context)

    clock[0] = 1_000.0 + 361
    result = handler.check_step_health(context)

    assert not result.is_healthy
    assert result.unhealthy_reason is not None
    assert "The ledger has been unreachable for 361 s" in result.unhealthy_reason
    assert "connection refused" in result.unhealthy_reason
