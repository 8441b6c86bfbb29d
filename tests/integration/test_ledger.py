"""The exactly-once ledger against a real PostgreSQL (the session's database).

The database is shared by the whole test session, so every test uses its own keys and
run ids, and counts over the whole table are compared before and after.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from dagster_taskiq.core.errors import LedgerUnavailable
from dagster_taskiq.core.ledger import (
    ERROR_TEXT_CHARS,
    NON_TERMINAL,
    TERMINAL,
    Claim,
    ClaimOutcome,
    Ledger,
    Status,
    StepRecord,
)
from dagster_taskiq.core.messages import payload_hash
from dagster_taskiq.core.migrations import ensure_schema

HASH = payload_hash('{"step": "args"}')
OTHER_HASH = payload_hash('{"step": "other"}')
LEASE = 60
TTL = 3_600


def _new_key(prefix: str = "step") -> str:
    return f"run-{uuid.uuid4().hex}:{prefix}:0"


def _enqueue(
    ledger: Ledger,
    *,
    run_id: str | None = None,
    step_key: str = "compute",
    attempt: int = 0,
    ttl_seconds: int = TTL,
) -> str:
    run_id = run_id or f"run-{uuid.uuid4().hex}"
    key = f"{run_id}:{step_key}:{attempt}"
    assert ledger.enqueue(
        key,
        run_id=run_id,
        step_key=step_key,
        attempt=attempt,
        payload_hash=HASH,
        ttl_seconds=ttl_seconds,
    )
    return key


def _claim(
    ledger: Ledger, key: str, worker: str = "w1", lease: int = LEASE, deliveries: int = 1
) -> Claim:
    return ledger.claim(
        key, worker_id=worker, lease_seconds=lease, payload_hash=HASH, deliveries=deliveries
    )


def _running(ledger: Ledger, worker: str = "w1", lease: int = LEASE) -> tuple[str, int]:
    key = _enqueue(ledger)
    claim = _claim(ledger, key, worker, lease)
    assert claim.outcome is ClaimOutcome.CLAIMED
    return key, claim.fencing_token


def _get(ledger: Ledger, key: str) -> StepRecord:
    record = ledger.get(key)
    assert record is not None, f"no ledger row for {key}"
    return record


def _taken_over(ledger: Ledger) -> tuple[str, int, int]:
    """A step claimed by w1 (token 1), released, then claimed by w2 (token 2)."""
    key, stale = _running(ledger, "w1")
    assert ledger.release(key, stale, "worker shutting down")
    claim = _claim(ledger, key, "w2")
    assert claim.outcome is ClaimOutcome.CLAIMED
    assert claim.is_takeover
    return key, stale, claim.fencing_token


# -- enqueue and get -------------------------------------------------------------------


def test_enqueue_is_idempotent(ledger: Ledger) -> None:
    run_id = f"run-{uuid.uuid4().hex}"
    key = f"{run_id}:compute:2"
    first = ledger.enqueue(
        key, run_id=run_id, step_key="compute", attempt=2, payload_hash=HASH, ttl_seconds=TTL
    )
    second = ledger.enqueue(
        key, run_id=run_id, step_key="compute", attempt=2, payload_hash=OTHER_HASH, ttl_seconds=1
    )
    assert first is True
    assert second is False
    record = _get(ledger, key)
    assert record.idempotency_key == key
    assert record.run_id == run_id
    assert record.step_key == "compute"
    assert record.attempt == 2
    assert record.status is Status.ENQUEUED
    assert record.payload_hash == HASH  # the second enqueue changed nothing
    assert record.worker_id is None
    assert record.fencing_token == 0
    assert record.lease_expires_at is None
    assert record.lease_live is False
    assert record.deliveries == 0
    assert record.duplicates_suppressed == 0
    assert record.error is None
    assert record.started_at is None
    assert record.finished_at is None
    assert record.enqueued_at.tzinfo is not None
    assert isinstance(record.age_seconds, float)
    assert 0.0 <= record.age_seconds < 60.0


def test_get_unknown_key_is_none(ledger: Ledger) -> None:
    assert ledger.get(_new_key()) is None


def test_status_terminal_sets() -> None:
    assert {s for s in Status if s.is_terminal} == {
        Status.SUCCEEDED,
        Status.FAILED,
        Status.DEAD_LETTERED,
        Status.CANCELLED,
    }
    assert frozenset(Status) == TERMINAL | NON_TERMINAL
    assert not TERMINAL & NON_TERMINAL


# -- claim -----------------------------------------------------------------------------


def test_claim_of_enqueued_step(ledger: Ledger) -> None:
    key = _enqueue(ledger)
    claim = _claim(ledger, key, "w1", deliveries=3)
    assert claim.outcome is ClaimOutcome.CLAIMED
    assert claim.fencing_token == 1
    assert claim.previous_status is Status.ENQUEUED
    assert claim.previous_worker is None
    assert claim.is_takeover is False
    record = _get(ledger, key)
    assert record.status is Status.RUNNING
    assert record.worker_id == "w1"
    assert record.fencing_token == 1
    assert record.lease_live is True
    assert record.deliveries == 3
    assert record.started_at is not None
    assert record.lease_expires_at is not None
    lease = record.lease_expires_at - record.started_at
    assert timedelta(seconds=LEASE - 1) < lease <= timedelta(seconds=LEASE)


def test_second_claim_while_lease_is_live_is_busy(ledger: Ledger) -> None:
    key, token = _running(ledger, "w1")
    claim = _claim(ledger, key, "w2")
    assert claim.outcome is ClaimOutcome.BUSY
    assert claim.fencing_token == 0
    assert claim.previous_worker == "w1"
    assert claim.previous_status is Status.RUNNING
    assert 0.0 < claim.lease_remaining_seconds <= LEASE
    assert claim.lease_remaining_seconds > LEASE - 10
    assert claim.is_takeover is False
    assert claim.record is not None
    assert claim.record.worker_id == "w1"
    record = _get(ledger, key)
    assert record.worker_id == "w1"
    assert record.fencing_token == token == 1


def test_takeover_after_lease_expires(ledger: Ledger) -> None:
    key, stale = _running(ledger, "w1", lease=1)
    first_start = _get(ledger, key).started_at
    time.sleep(1.2)
    assert _get(ledger, key).lease_live is False
    claim = _claim(ledger, key, "w2", deliveries=2)
    assert claim.outcome is ClaimOutcome.CLAIMED
    assert claim.fencing_token == 2
    assert claim.is_takeover is True
    assert claim.previous_worker == "w1"
    assert claim.previous_status is Status.RUNNING
    record = _get(ledger, key)
    assert record.worker_id == "w2"
    assert record.fencing_token == 2
    assert record.lease_live is True
    assert record.started_at == first_start  # the attempt started with the first delivery
    assert record.deliveries == 2

    # The first worker lost the step: nothing it does is recorded.
    assert ledger.heartbeat(key, stale, LEASE) is False
    assert ledger.complete(key, stale, succeeded=True) is False
    assert ledger.fail(key, stale, "late failure") is False
    assert ledger.release(key, stale, "late release") is False
    assert ledger.finish_cancel(key, stale) is False
    after = _get(ledger, key)
    assert after.status is Status.RUNNING
    assert after.worker_id == "w2"
    assert after.fencing_token == 2
    assert after.error is None
    assert after.lease_live is True
    # The new holder still holds it.
    assert ledger.heartbeat(key, claim.fencing_token, LEASE) is True
    assert ledger.complete(key, claim.fencing_token, succeeded=True) is True
    assert _get(ledger, key).status is Status.SUCCEEDED


FencedAction = Callable[[Ledger, str, int], bool]
ACTIONS: dict[str, tuple[FencedAction, Status]] = {
    "heartbeat": (lambda lg, k, t: lg.heartbeat(k, t, LEASE), Status.RUNNING),
    "complete": (lambda lg, k, t: lg.complete(k, t, succeeded=True), Status.SUCCEEDED),
    "complete-failed": (
        lambda lg, k, t: lg.complete(k, t, succeeded=False, error="boom"),
        Status.FAILED,
    ),
    "fail": (lambda lg, k, t: lg.fail(k, t, "boom"), Status.FAILED),
    "release": (lambda lg, k, t: lg.release(k, t, "shutdown"), Status.RUNNING),
    "finish_cancel": (lambda lg, k, t: lg.finish_cancel(k, t), Status.CANCELLED),
}


@pytest.mark.parametrize("name", list(ACTIONS))
def test_stale_token_is_fenced_off(ledger: Ledger, name: str) -> None:
    action, expected = ACTIONS[name]
    key, stale, fresh = _taken_over(ledger)
    assert (stale, fresh) == (1, 2)
    assert action(ledger, key, stale) is False
    unchanged = _get(ledger, key)
    assert unchanged.status is Status.RUNNING
    assert unchanged.fencing_token == 2
    assert unchanged.worker_id == "w2"
    assert unchanged.lease_live is True
    assert unchanged.error is None  # the release reason of w1 was cleared by the claim

    assert action(ledger, key, fresh) is True
    record = _get(ledger, key)
    assert record.status is expected
    assert record.fencing_token == 2
    if expected.is_terminal:
        assert record.finished_at is not None
        assert record.lease_expires_at is None
    if name in {"fail", "complete-failed"}:
        assert record.error == "boom"


def test_heartbeat_extends_the_lease(ledger: Ledger) -> None:
    key, token = _running(ledger, lease=5)
    before = _get(ledger, key).lease_expires_at
    assert ledger.heartbeat(key, token, 600) is True
    after = _get(ledger, key).lease_expires_at
    assert before is not None
    assert after is not None
    assert after - before > timedelta(seconds=590)


def test_heartbeat_of_enqueued_or_unknown_step_is_false(ledger: Ledger) -> None:
    key = _enqueue(ledger)
    assert ledger.heartbeat(key, 0, LEASE) is False
    assert ledger.heartbeat(_new_key(), 1, LEASE) is False
    assert _get(ledger, key).status is Status.ENQUEUED


def test_release_lets_the_next_claim_in_immediately(ledger: Ledger) -> None:
    key, token = _running(ledger, "w1")
    assert ledger.release(key, token, "step process died") is True
    released = _get(ledger, key)
    assert released.status is Status.RUNNING
    assert released.lease_live is False
    assert released.error == "step process died"
    claim = _claim(ledger, key, "w2")
    assert claim.outcome is ClaimOutcome.CLAIMED
    assert claim.fencing_token == token + 1
    assert claim.previous_worker == "w1"
    assert claim.is_takeover is True
    record = _get(ledger, key)
    assert record.error is None
    assert record.lease_live is True


def test_complete_then_claim_is_duplicate(ledger: Ledger) -> None:
    key, token = _running(ledger)
    assert ledger.complete(key, token, succeeded=True) is True
    record = _get(ledger, key)
    assert record.status is Status.SUCCEEDED
    assert record.finished_at is not None
    assert record.lease_expires_at is None
    assert record.lease_live is False
    assert record.duplicates_suppressed == 0

    claim = _claim(ledger, key, "w2", deliveries=4)
    assert claim.outcome is ClaimOutcome.DUPLICATE
    assert claim.fencing_token == 0
    assert claim.record is not None
    assert claim.record.status is Status.SUCCEEDED
    assert _get(ledger, key).duplicates_suppressed == 1
    assert _claim(ledger, key, "w3", deliveries=2).outcome is ClaimOutcome.DUPLICATE
    record = _get(ledger, key)
    assert record.duplicates_suppressed == 2
    assert record.deliveries == 4
    assert record.status is Status.SUCCEEDED
    assert record.worker_id == "w1"
    # Completing twice does nothing.
    assert ledger.complete(key, token, succeeded=False, error="again") is False
    assert _get(ledger, key).status is Status.SUCCEEDED


def test_complete_as_duplicate_counts_suppressed(ledger: Ledger) -> None:
    key, token = _running(ledger)
    assert ledger.complete(key, token, succeeded=True, duplicate=True) is True
    record = _get(ledger, key)
    assert record.status is Status.SUCCEEDED
    assert record.duplicates_suppressed == 1


def test_fail_records_the_error_and_is_terminal(ledger: Ledger) -> None:
    key, token = _running(ledger)
    assert ledger.fail(key, token, "ValueError: bad input") is True
    record = _get(ledger, key)
    assert record.status is Status.FAILED
    assert record.error == "ValueError: bad input"
    assert _claim(ledger, key, "w2").outcome is ClaimOutcome.DUPLICATE


def test_claim_with_other_payload_is_mismatch(ledger: Ledger) -> None:
    key = _enqueue(ledger)
    claim = ledger.claim(key, worker_id="w1", lease_seconds=LEASE, payload_hash=OTHER_HASH)
    assert claim.outcome is ClaimOutcome.MISMATCH
    assert claim.record is not None
    assert claim.record.payload_hash == HASH
    record = _get(ledger, key)
    assert record.status is Status.ENQUEUED
    assert record.fencing_token == 0
    # A terminal row with another payload is a mismatch too, not a duplicate.
    token = _claim(ledger, key).fencing_token
    assert ledger.complete(key, token, succeeded=True)
    claim = ledger.claim(key, worker_id="w2", lease_seconds=LEASE, payload_hash=OTHER_HASH)
    assert claim.outcome is ClaimOutcome.MISMATCH
    assert _get(ledger, key).duplicates_suppressed == 0


def test_claim_of_unknown_key(ledger: Ledger) -> None:
    claim = _claim(ledger, _new_key())
    assert claim.outcome is ClaimOutcome.UNKNOWN
    assert claim.record is None
    assert claim.fencing_token == 0


def _claim_at_once(ledger: Ledger, key: str, workers: int) -> list[Claim]:
    barrier = threading.Barrier(workers)

    def attempt(i: int) -> Claim:
        barrier.wait(timeout=10)
        return _claim(ledger, key, f"racer-{i}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(attempt, range(workers)))


def test_concurrent_claims_exactly_one_wins(ledger: Ledger) -> None:
    key = _enqueue(ledger)
    claims = _claim_at_once(ledger, key, 8)
    winners = [c for c in claims if c.outcome is ClaimOutcome.CLAIMED]
    assert len(winners) == 1
    assert winners[0].fencing_token == 1
    assert sorted(c.outcome.value for c in claims) == ["busy"] * 7 + ["claimed"]
    record = _get(ledger, key)
    assert record.fencing_token == 1
    assert record.worker_id is not None
    assert record.worker_id.startswith("racer-")
    assert all(c.previous_worker == record.worker_id for c in claims if c is not winners[0])


def test_concurrent_takeover_exactly_one_wins(ledger: Ledger) -> None:
    key, token = _running(ledger, "w0")
    assert ledger.release(key, token, "lost")
    claims = _claim_at_once(ledger, key, 8)
    winners = [c for c in claims if c.outcome is ClaimOutcome.CLAIMED]
    assert len(winners) == 1
    assert winners[0].fencing_token == 2
    assert winners[0].is_takeover
    assert winners[0].previous_worker == "w0"
    assert _get(ledger, key).fencing_token == 2


# -- cancellation ----------------------------------------------------------------------


def test_request_cancel_of_enqueued_step(ledger: Ledger) -> None:
    key = _enqueue(ledger)
    assert ledger.request_cancel(key) is Status.ENQUEUED
    assert _get(ledger, key).status is Status.CANCEL_REQUESTED
    claim = _claim(ledger, key, "w1")
    assert claim.outcome is ClaimOutcome.CANCELLED
    assert claim.fencing_token == 0
    record = _get(ledger, key)
    assert record.status is Status.CANCELLED
    assert record.finished_at is not None
    assert record.worker_id is None
    # Already terminal: later deliveries are duplicates, another cancel is a no-op.
    assert _claim(ledger, key, "w2").outcome is ClaimOutcome.DUPLICATE
    assert ledger.request_cancel(key) is None


def test_request_cancel_of_running_step(ledger: Ledger) -> None:
    key, token = _running(ledger, "w1")
    assert ledger.request_cancel(key) is Status.RUNNING
    assert ledger.heartbeat(key, token, LEASE) is False
    record = _get(ledger, key)
    assert record.status is Status.CANCEL_REQUESTED
    assert record.fencing_token == token
    # Another delivery meanwhile: the holder's lease is still live.
    busy = _claim(ledger, key, "w2")
    assert busy.outcome is ClaimOutcome.BUSY
    assert busy.previous_status is Status.CANCEL_REQUESTED
    assert ledger.complete(key, token, succeeded=True) is False
    assert ledger.request_cancel(key) is None  # already requested
    assert ledger.finish_cancel(key, token) is True
    record = _get(ledger, key)
    assert record.status is Status.CANCELLED
    assert record.lease_expires_at is None
    assert record.finished_at is not None
    assert ledger.finish_cancel(key, token) is False


def test_cancel_requested_step_whose_worker_released_is_cancelled_by_next_claim(
    ledger: Ledger,
) -> None:
    key, token = _running(ledger, "w1")
    assert ledger.request_cancel(key) is Status.RUNNING
    assert ledger.release(key, token, "worker stopping") is True
    claim = _claim(ledger, key, "w2")
    assert claim.outcome is ClaimOutcome.CANCELLED
    assert _get(ledger, key).status is Status.CANCELLED


@pytest.mark.parametrize("ending", ["succeeded", "failed", "dead_lettered", "cancelled"])
def test_request_cancel_of_terminal_step_is_none(ledger: Ledger, ending: str) -> None:
    key, token = _running(ledger)
    if ending == "succeeded":
        assert ledger.complete(key, token, succeeded=True)
    elif ending == "failed":
        assert ledger.fail(key, token, "boom")
    elif ending == "dead_lettered":
        assert ledger.dead_letter(key, deliveries=5, reason="dlq")
    else:
        assert ledger.finish_cancel(key, token)
    status = _get(ledger, key).status
    assert status.is_terminal
    assert ledger.request_cancel(key) is None
    assert _get(ledger, key).status is status


def test_request_cancel_of_unknown_key_is_none(ledger: Ledger) -> None:
    assert ledger.request_cancel(_new_key()) is None


# -- abandon and dead letter -----------------------------------------------------------


def test_abandon_only_moves_enqueued_to_failed(ledger: Ledger) -> None:
    key = _enqueue(ledger)
    assert ledger.abandon(key, "not picked up in 600s") is True
    record = _get(ledger, key)
    assert record.status is Status.FAILED
    assert record.error == "not picked up in 600s"
    assert record.finished_at is not None
    assert ledger.abandon(key, "again") is False
    assert _claim(ledger, key).outcome is ClaimOutcome.DUPLICATE

    running, token = _running(ledger)
    assert ledger.abandon(running, "too late") is False
    record = _get(ledger, running)
    assert record.status is Status.RUNNING
    assert record.error is None
    assert ledger.heartbeat(running, token, LEASE) is True

    assert ledger.abandon(_new_key(), "unknown") is False


def test_dead_letter_of_running_step(ledger: Ledger) -> None:
    key, token = _running(ledger)
    assert ledger.dead_letter(key, deliveries=5, reason="max receives") is True
    record = _get(ledger, key)
    assert record.status is Status.DEAD_LETTERED
    assert record.deliveries == 5
    assert record.error == "max receives"
    assert record.lease_expires_at is None
    assert record.finished_at is not None
    assert ledger.dead_letter(key, deliveries=6, reason="again") is False
    assert _get(ledger, key).deliveries == 5
    # The worker that held it can no longer record anything.
    assert ledger.heartbeat(key, token, LEASE) is False
    assert ledger.complete(key, token, succeeded=True) is False
    assert _claim(ledger, key, "w2").outcome is ClaimOutcome.DUPLICATE


def test_dead_letter_of_enqueued_and_cancel_requested_steps(ledger: Ledger) -> None:
    enqueued = _enqueue(ledger)
    assert ledger.dead_letter(enqueued, deliveries=3, reason="dlq") is True
    assert _get(ledger, enqueued).status is Status.DEAD_LETTERED
    cancelling, _ = _running(ledger)
    assert ledger.request_cancel(cancelling) is Status.RUNNING
    assert ledger.dead_letter(cancelling, deliveries=3, reason="dlq") is True
    assert _get(ledger, cancelling).status is Status.DEAD_LETTERED


def test_dead_letter_leaves_a_completed_step_alone(ledger: Ledger) -> None:
    key, token = _running(ledger)
    assert ledger.complete(key, token, succeeded=True)
    assert ledger.dead_letter(key, deliveries=9, reason="lost delete") is False
    record = _get(ledger, key)
    assert record.status is Status.SUCCEEDED
    assert record.error is None
    assert record.deliveries == 1
    assert ledger.dead_letter(_new_key(), deliveries=1, reason="unknown") is False


# -- counts and cleanup ----------------------------------------------------------------


def test_live_leases_counts_live_running_leases(ledger: Ledger) -> None:
    # Other tests' leases may expire between two counts; retry with fresh steps if the
    # baseline moved meanwhile.
    observed: list[tuple[int, int, int]] = []
    for _ in range(3):
        before = ledger.live_leases()
        running, _ = _running(ledger)
        cancelling, cancel_token = _running(ledger)
        assert ledger.request_cancel(cancelling) is Status.RUNNING
        released, released_token = _running(ledger)
        assert ledger.release(released, released_token, "gone")
        finished, finished_token = _running(ledger)
        assert ledger.complete(finished, finished_token, succeeded=True)
        _enqueue(ledger)
        during = ledger.live_leases()
        assert ledger.dead_letter(running, deliveries=1, reason="cleanup")
        assert ledger.finish_cancel(cancelling, cancel_token)
        after = ledger.live_leases()
        observed.append((before, during, after))
        if during - before == 2 and after == before:
            break
    else:
        pytest.fail(f"live_leases did not count the 2 live leases: {observed}")


def test_cleanup_expired_deletes_only_expired_terminal_rows(ledger: Ledger) -> None:
    succeeded, token = _running_with_ttl(ledger, 0)
    assert ledger.complete(succeeded, token, succeeded=True)
    abandoned = _enqueue(ledger, ttl_seconds=0)
    assert ledger.abandon(abandoned, "timeout")
    dead, _ = _running_with_ttl(ledger, 0)
    assert ledger.dead_letter(dead, deliveries=1, reason="dlq")
    enqueued = _enqueue(ledger, ttl_seconds=0)
    running, _ = _running_with_ttl(ledger, 0)
    cancelling, _ = _running_with_ttl(ledger, 0)
    assert ledger.request_cancel(cancelling) is Status.RUNNING
    fresh, fresh_token = _running_with_ttl(ledger, TTL)
    assert ledger.complete(fresh, fresh_token, succeeded=True)
    time.sleep(0.05)

    deleted = ledger.cleanup_expired()
    assert deleted >= 3
    for key in (succeeded, abandoned, dead):
        assert ledger.get(key) is None
    assert _get(ledger, enqueued).status is Status.ENQUEUED
    assert _get(ledger, running).status is Status.RUNNING
    assert _get(ledger, cancelling).status is Status.CANCEL_REQUESTED
    assert _get(ledger, fresh).status is Status.SUCCEEDED
    # A delivery after cleanup finds no row.
    assert _claim(ledger, succeeded).outcome is ClaimOutcome.UNKNOWN


def _running_with_ttl(ledger: Ledger, ttl_seconds: int) -> tuple[str, int]:
    key = _enqueue(ledger, ttl_seconds=ttl_seconds)
    claim = _claim(ledger, key)
    assert claim.outcome is ClaimOutcome.CLAIMED
    return key, claim.fencing_token


def test_for_run_returns_the_run_rows_in_enqueue_order(ledger: Ledger) -> None:
    run_id = f"run-{uuid.uuid4().hex}"
    order = ["zeta", "alpha", "mid", "beta"]
    keys = [_enqueue(ledger, run_id=run_id, step_key=step) for step in order]
    _enqueue(ledger)  # another run
    token = _claim(ledger, keys[1]).fencing_token
    assert ledger.complete(keys[1], token, succeeded=True)
    records = ledger.for_run(run_id)
    assert [r.step_key for r in records] == order
    assert [r.idempotency_key for r in records] == keys
    assert [r.status for r in records] == [
        Status.ENQUEUED,
        Status.SUCCEEDED,
        Status.ENQUEUED,
        Status.ENQUEUED,
    ]
    times = [r.enqueued_at for r in records]
    assert times == sorted(times)
    assert ledger.for_run(f"run-{uuid.uuid4().hex}") == []


# -- rejected messages -----------------------------------------------------------------


def test_record_rejection_upserts_by_message_id(ledger: Ledger) -> None:
    message_id = uuid.uuid4().hex
    other_id = uuid.uuid4().hex
    ledger.record_rejection(
        message_id=message_id,
        reason="forged",
        detail="d" * 3_000,
        body="b" * 5_000,
        worker_id="w1",
        idempotency_key="run:step:0",
    )
    ledger.record_rejection(
        message_id=other_id, reason="malformed", detail="not JSON", body="{", worker_id=None
    )

    def row(mid: str) -> dict[str, object]:
        rows = [dict(r) for r in ledger.rejections() if r["message_id"] == mid]
        assert len(rows) == 1
        return rows[0]

    first = row(message_id)
    assert first["reason"] == "forged"
    assert first["receive_count"] == 1
    # Cut to 2000 characters, saying so.
    assert first["detail"] == "d" * 1_974 + "... [3000 characters, cut]"
    assert first["body_excerpt"] == "b" * 1_974 + "... [5000 characters, cut]"
    assert first["worker_id"] == "w1"
    assert first["idempotency_key"] == "run:step:0"
    assert first["first_seen_at"] == first["last_seen_at"]
    other = row(other_id)
    assert other["idempotency_key"] is None
    assert other["worker_id"] is None
    assert other["receive_count"] == 1

    ledger.record_rejection(
        message_id=message_id, reason="forged", detail="again", body="b", worker_id="w2"
    )
    ledger.record_rejection(
        message_id=message_id, reason="forged", detail="again", body="b", worker_id="w3"
    )
    again = row(message_id)
    assert again["receive_count"] == 3
    assert again["worker_id"] == "w3"
    assert again["first_seen_at"] == first["first_seen_at"]
    last_seen = again["last_seen_at"]
    assert isinstance(last_seen, datetime)
    assert isinstance(first["first_seen_at"], datetime)
    assert last_seen > first["first_seen_at"]
    # The first record is kept otherwise.
    assert again["detail"] == first["detail"]
    assert again["idempotency_key"] == "run:step:0"
    assert row(other_id)["receive_count"] == 1

    ids = [r["message_id"] for r in ledger.rejections()]
    assert ids.index(message_id) < ids.index(other_id)


# -- schema ----------------------------------------------------------------------------


def test_ensure_schema_twice(ledger: Ledger) -> None:
    ensure_schema(ledger)
    ensure_schema(ledger)
    key = _enqueue(ledger)
    assert _get(ledger, key).status is Status.ENQUEUED


def test_ensure_schema_concurrently_on_an_empty_database(empty_database_url: str) -> None:
    ledgers = [Ledger(empty_database_url) for _ in range(4)]
    barrier = threading.Barrier(len(ledgers))

    def create(store: Ledger) -> None:
        barrier.wait(timeout=10)
        ensure_schema(store)

    try:
        with ThreadPoolExecutor(max_workers=len(ledgers)) as pool:
            list(pool.map(create, ledgers))  # re-raises any thread's exception
        tables = set(sa.inspect(ledgers[0].engine).get_table_names())
        assert {"dagster_taskiq_steps", "dagster_taskiq_rejected_messages"} <= tables
        ensure_schema(ledgers[0])
        key = _enqueue(ledgers[1])
        assert _claim(ledgers[2], key).fencing_token == 1
        assert ledgers[3].rejections() == []
    finally:
        for store in ledgers:
            store.dispose()


# -- unreachable database --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://postgres@127.0.0.1:1/x", "postgresql+pg8000://postgres@127.0.0.1:1/x"),
        (
            "postgresql://postgres:hunter2@127.0.0.1:1/x",
            "postgresql+pg8000://postgres:***@127.0.0.1:1/x",
        ),
    ],
)
def test_unreachable_database_raises_ledger_unavailable(url: str, shown: str) -> None:
    store = Ledger(url)
    try:
        assert repr(store) == f"Ledger({shown})"
        with pytest.raises(LedgerUnavailable) as info:
            store.ping()
        assert shown in str(info.value)
        assert "hunter2" not in str(info.value)
        with pytest.raises(LedgerUnavailable) as info:
            store.claim("r:s:0", worker_id="w1", lease_seconds=LEASE, payload_hash=HASH)
        assert "hunter2" not in str(info.value)
        with pytest.raises(LedgerUnavailable):
            store.enqueue(
                "r:s:0", run_id="r", step_key="s", attempt=0, payload_hash=HASH, ttl_seconds=TTL
            )
    finally:
        store.dispose()


@pytest.mark.parametrize(
    ("state", "outage"),
    [("57P03", True), ("57P01", True), ("08006", True), ("53300", True), ("23505", False)],
)
def test_a_server_going_away_is_an_outage_and_a_bad_statement_is_not(
    state: str, outage: bool
) -> None:
    # pg8000 reports the server's own errors (a restart: "the database system is shutting
    # down") as DatabaseError; by their SQLSTATE they are outages, safe to retry.
    from pg8000.exceptions import DatabaseError

    from dagster_taskiq.core.ledger import _is_outage

    orig = DatabaseError({"S": "FATAL", "C": state, "M": "message from the server"})
    error = sa.exc.DBAPIError.instance("SELECT 1", {}, orig, DatabaseError)
    assert _is_outage(error) is outage


def test_a_server_dropping_connections_while_they_open_is_an_outage() -> None:
    """A server shutting down resets connections as they open; pg8000 then raises a bare
    socket error (BrokenPipeError, ConnectionResetError), which must read as an outage."""
    import socket
    import struct
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def reset_every_connection() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            # Linger 0: close() sends a reset, as a server killing its backends does.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=reset_every_connection, daemon=True)
    thread.start()
    store = Ledger(f"postgresql://postgres@127.0.0.1:{port}/x")
    try:
        for _ in range(3):
            with pytest.raises(LedgerUnavailable):
                ensure_schema(store)
    finally:
        stop.set()
        thread.join(2)
        listener.close()
        store.dispose()


def test_an_error_text_postgresql_cannot_store_is_recorded_made_storable(ledger: Ledger) -> None:
    """An op's exception text is the user's: NUL or a lone surrogate in it must not keep
    the attempt's failure from being recorded (the message would be delivered until it
    dead-letters), and a huge one is kept bounded."""
    key, token = _running(ledger)
    assert ledger.complete(key, token, succeeded=False, error="bad\x00byte \ud800" + "x" * 10**5)
    record = _get(ledger, key)
    assert record.status is Status.FAILED
    assert record.error is not None
    assert record.error.startswith("bad\ufffdbyte \ufffd")
    assert len(record.error) <= ERROR_TEXT_CHARS
    assert "characters, cut]" in record.error
