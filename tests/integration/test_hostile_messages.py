"""Hostile messages against the real ledger: whatever a body holds, decoding rejects it
cleanly or vetting answers for it, its rejection is recorded, and the ledger's pool keeps
working. A pool of one connection makes a connection left out of step fail the very
next statement."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dagster_taskiq.core.errors import LedgerUnavailable, MessageRejected
from dagster_taskiq.core.ledger import ClaimOutcome, Ledger
from dagster_taskiq.core.messages import decode, payload_hash, peek_key
from dagster_taskiq.core.migrations import ensure_schema
from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.execution import load_step_args, vet
from dagster_taskiq.worker.origins import origin_allowed
from dagster_taskiq.worker.tasks import VetRequest
from tests.hostile import (
    ALLOWED_MODULE,
    MAX_MESSAGE_BYTES,
    SIGNING_KEY,
    hostile_bodies,
)

HASH = payload_hash('{"step": "args"}')
LOCATIONS = (CodeLocation(ALLOWED_MODULE),)
RUN_IDS = [str(uuid.uuid4()) for _ in range(3)]


@pytest.fixture
def pool_of_one(postgres_url: str) -> Iterator[Ledger]:
    store = Ledger(postgres_url, pool_size=1)
    ensure_schema(store)
    yield store
    store.dispose()


def _claim_works(ledger: Ledger) -> None:
    """A new step can be enqueued and claimed, and reads return their own rows."""
    run_id = f"run-{uuid.uuid4().hex}"
    key = f"{run_id}:step:0"
    assert ledger.enqueue(
        key, run_id=run_id, step_key="step", attempt=0, payload_hash=HASH, ttl_seconds=600
    )
    claim = ledger.claim(key, worker_id="w", lease_seconds=30, payload_hash=HASH)
    assert claim.outcome is ClaimOutcome.CLAIMED
    record = ledger.get(key)
    assert record is not None and record.idempotency_key == key


def _backend_pid(ledger: Ledger) -> int:
    with ledger.transaction() as conn:
        return int(conn.execute(sa.text("select pg_backend_pid()")).scalar_one())


def test_a_rejection_with_unstorable_text_is_recorded_and_the_pool_still_works(
    pool_of_one: Ledger,
) -> None:
    ledger = pool_of_one
    body = '{"schema":1,"idempotency_key":"\\ud800"}'  # as the probe sent it
    key = peek_key(body)
    assert key == "\ud800"
    message_id = str(uuid.uuid4())
    ledger.record_rejection(
        message_id=message_id,
        reason="forged",
        detail="detail \x00 with \udfff" + "d" * 5_000,
        body=body + "\x00",
        worker_id="w",
        idempotency_key=key,
    )
    _claim_works(ledger)
    _claim_works(ledger)
    (row,) = [r for r in ledger.rejections() if r["message_id"] == message_id]
    assert row["idempotency_key"] == "\ufffd"
    assert row["detail"].startswith("detail \ufffd with \ufffd")
    assert len(row["detail"]) == 2_000 and row["detail"].endswith("characters, cut]")
    assert row["body_excerpt"] == body + "\ufffd"


def test_a_statement_that_failed_on_this_side_never_goes_back_to_the_pool(
    pool_of_one: Ledger,
) -> None:
    ledger = pool_of_one
    first = _backend_pid(ledger)
    # The server refuses cleanly (a SQLSTATE): the connection stays in step, and is kept.
    with pytest.raises(sa.exc.DBAPIError), ledger.transaction() as conn:
        conn.execute(sa.text("select 1 / 0"))
    assert _backend_pid(ledger) == first
    # The driver cannot encode a value after part of the statement is on the wire: that
    # connection is discarded, and the next statement runs on a new one.
    with pytest.raises(UnicodeEncodeError), ledger.transaction() as conn:
        conn.execute(sa.text("select :value"), {"value": "\ud800"})
    second = _backend_pid(ledger)
    assert second != first
    with ledger.transaction() as conn:
        assert (
            conn.execute(sa.text("select :value"), {"value": "in step"}).scalar_one() == "in step"
        )
    _claim_works(ledger)
    # Nor is a connection whose transaction was interrupted mid-way.
    with pytest.raises(KeyboardInterrupt), ledger.transaction() as conn:
        conn.execute(sa.text("select 1"))
        raise KeyboardInterrupt
    assert _backend_pid(ledger) != second
    _claim_works(ledger)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(body=hostile_bodies(RUN_IDS), signing_key=st.sampled_from([SIGNING_KEY, None]))
def test_hostile_bodies_are_rejected_or_answered_and_always_recorded(
    pool_of_one: Ledger, body: str, signing_key: str | None
) -> None:
    ledger = pool_of_one
    reason: str
    try:
        message = decode(body, signing_key=signing_key, max_bytes=MAX_MESSAGE_BYTES)
    except MessageRejected as e:  # anything else fails the test
        reason, detail = e.reason, e.detail
    else:
        vetting = vet(VetRequest(message.step_args, message.run_id, message.step_key), LOCATIONS)
        if vetting.malformed is None and vetting.refusal is None:
            # Accepted: the arguments are the message's own, from an allowed location.
            args = load_step_args(message.step_args)
            assert args.run_id == message.run_id
            assert args.step_keys_to_execute == [message.step_key]
            assert origin_allowed(args.job_origin, LOCATIONS) is None
        reason = "malformed" if vetting.malformed else "refused" if vetting.refusal else "accepted"
        detail = vetting.malformed or vetting.refusal or "accepted"
    event(f"{reason}: {detail[:25]}")  # what the examples reached, in the statistics
    with contextlib.suppress(LedgerUnavailable):  # anything else fails the test
        ledger.record_rejection(
            message_id=str(uuid.uuid4()),
            reason=reason,
            detail=detail,
            body=body,
            worker_id="w",
            idempotency_key=peek_key(body),
        )
    _claim_works(ledger)
