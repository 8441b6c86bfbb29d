"""Alerts are bounded: a dead letter whose step key is 100,000 characters long is processed
and alerted through the emulator's real SNS in under 256 KiB, valid or not."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import pytest

from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.core.messages import StepMessage, encode
from dagster_taskiq.dead_letters.processor import (
    ALERT_FIELD_MAX_BYTES,
    SNS_MESSAGE_MAX_BYTES,
    DeadLetterProcessor,
    Outcome,
    SnsAlerts,
    clip,
)
from tests.integration.test_dead_letters import (
    LEASE,
    SIGNING_KEY,
    UI_URL,
    Alert,
    AlertInbox,
    emulator_credentials,
    launch,
    letter,
    rejection,
    row,
    start,
)

LONG = 100_000
# A valid message carries its step key twice (and JSON escapes non-ASCII 6 bytes a
# character): the most SQS takes is 1 MiB.
MAX_BODY_BYTES = 1_048_576
KEYS = {"ascii": "k" * LONG, "non_ascii": "é" * 60_000}


@pytest.fixture
def alerts_inbox(sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> AlertInbox:
    emulator_credentials(monkeypatch)
    return AlertInbox(sqs_endpoint)


@pytest.fixture
def dlq_processor(ledger: Ledger, alerts_inbox: AlertInbox) -> DeadLetterProcessor:
    return DeadLetterProcessor(
        ledger,
        SnsAlerts(alerts_inbox.sns, alerts_inbox.topic_arn),
        signing_key=SIGNING_KEY,
        dagster_ui_url=UI_URL,
    )


def bounded(alert: Alert) -> None:
    """What SNS takes, with the machine line whole and every quoted value bounded."""
    assert len(alert.message.encode()) <= SNS_MESSAGE_MAX_BYTES
    assert len(alert.subject) <= 100
    for value in alert.fields.values():
        if isinstance(value, str):
            assert len(value.encode()) <= ALERT_FIELD_MAX_BYTES
    assert "cut]" in alert.message


def long_message(step_key: str) -> StepMessage:
    return StepMessage.new(
        run_id=str(uuid.uuid4()),
        step_key=step_key,
        attempt=0,
        step_args='{"op": "long"}',
        lease_seconds=LEASE,
    )


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_a_valid_dead_letter_with_a_huge_step_key_is_marked_and_alerted(
    ledger: Ledger, alerts_inbox: AlertInbox, dlq_processor: DeadLetterProcessor, kind: str
) -> None:
    message = long_message(KEYS[kind])
    assert ledger.enqueue(
        message.idempotency_key,
        run_id=message.run_id,
        step_key=message.step_key,
        attempt=0,
        payload_hash=message.payload_hash,
        ttl_seconds=3_600,
    )
    start(ledger, message, deliveries=5)
    body = encode(message, signing_key=SIGNING_KEY, max_bytes=MAX_BODY_BYTES)

    result = dlq_processor.process(letter(body))

    assert result.outcome is Outcome.MARKED
    assert result.alerted, result.detail
    assert row(ledger, message).status is Status.DEAD_LETTERED
    [alert] = alerts_inbox.take()
    bounded(alert)
    assert alert.fields["run_id"] == message.run_id
    assert alert.fields["deliveries"] == 5
    assert alert.fields["step_key"].startswith(KEYS[kind][:100])
    assert f"{UI_URL.rstrip('/')}/runs/{message.run_id}" in alert.message


def _unknown(ledger: Ledger) -> str:
    return encode(long_message("u" * LONG), signing_key=SIGNING_KEY, max_bytes=MAX_BODY_BYTES)


def _forged(ledger: Ledger) -> str:
    message = long_message("f" * LONG)
    launch(ledger, message, signing_key=None)
    return encode(message, signing_key="someone-elses-key", max_bytes=MAX_BODY_BYTES)


def _mismatch(ledger: Ledger) -> str:
    launched = long_message("m" * LONG)
    launch(ledger, launched, signing_key=None)
    other = StepMessage.new(
        run_id=launched.run_id,
        step_key=launched.step_key,
        attempt=0,
        step_args='{"op": "something else"}',
        lease_seconds=LEASE,
    )
    return encode(other, signing_key=SIGNING_KEY, max_bytes=MAX_BODY_BYTES)


def _unknown_version(ledger: Ledger) -> str:
    return json.dumps({"schema": 99, "idempotency_key": "v" * LONG, "detail": "d" * LONG})


def _emoji_key(ledger: Ledger) -> str:
    # Four bytes a character: 100,000 of them are 400 KB, under moto's count of characters.
    return json.dumps({"schema": 99, "idempotency_key": "\U0001f600" * LONG}, ensure_ascii=False)


MALFORMED: dict[str, tuple[Callable[[Ledger], str], Outcome, str]] = {
    "unknown_key": (_unknown, Outcome.UNKNOWN_KEY, "dead_letter_unknown_key"),
    "forged": (_forged, Outcome.MALFORMED, "dead_letter_forged"),
    "mismatch": (_mismatch, Outcome.MALFORMED, "dead_letter_mismatch"),
    "unknown_version": (_unknown_version, Outcome.MALFORMED, "dead_letter_unknown_version"),
    "emoji_key": (_emoji_key, Outcome.MALFORMED, "dead_letter_unknown_version"),
}


@pytest.mark.parametrize("variant", sorted(MALFORMED))
def test_a_malformed_dead_letter_with_a_huge_key_is_recorded_and_alerted(
    ledger: Ledger, alerts_inbox: AlertInbox, dlq_processor: DeadLetterProcessor, variant: str
) -> None:
    make, outcome, reason = MALFORMED[variant]
    dead = letter(make(ledger))

    # Before alerts were bounded, SNS refused these on every try, until retention ended.
    result = dlq_processor.process(dead)

    assert result.outcome is outcome and result.alerted
    assert rejection(ledger, dead.message_id)["reason"] == reason
    [alert] = alerts_inbox.take()
    bounded(alert)
    assert dead.message_id in alert.message


# -- clip ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["k" * 5_000, "é" * 5_000, "\U0001f600" * 5_000, "a\ud800" * 2_000]
)
@pytest.mark.parametrize("limit", [0, 10, 100, 1_000, 4_095])
def test_clip_bounds_bytes_and_never_splits_a_character(text: str, limit: int) -> None:
    clipped = clip(text, limit)

    data = clipped.encode()  # always encodes: a lone surrogate became U+FFFD
    assert len(data) <= limit
    if limit >= 100:
        assert clipped.endswith(" bytes, cut]") and f"[{len(text)} characters, " in clipped


def test_clip_keeps_what_fits() -> None:
    assert clip("short", 5) == "short"
    assert clip("é" * 10, 20) == "é" * 10
