"""The dead-letter processor: what happens to a step whose message no worker could finish.

A step's message reaches the dead-letter queue after maxReceiveCount deliveries, typically
because its op kills the worker every time. The DLQ Lambda hands each dead letter to
``DeadLetterProcessor.process``, which marks the step DEAD_LETTERED in the ledger (so the
executor fails it at its next health check instead of waiting for ever) and alerts once,
on that transition only. A message can also reach the DLQ after its step finished (a
delete that was lost): the ledger leaves a terminal row alone, so nothing is marked and
nobody is paged.

Alerts are plain text for people; their last line is one JSON object for machines, whose
``attempt`` is 0-based as in the idempotency key. Every value an alert quotes is cut to
``ALERT_FIELD_MAX_BYTES`` and the whole to what SNS takes, saying so: a step key of any
length never makes a dead letter unprocessable.

A step whose last delivery's worker stopped heartbeating may already be DEAD_LETTERED when
its letter comes: the executor presumes so when this processor is late (see ``health``).
The processor confirms such a row, once, and that confirmation is what alerts.

Dagster-free: the Lambda imports it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dagster_taskiq.core.errors import LedgerUnavailable, MessageRejected
from dagster_taskiq.core.ledger import REJECTION_TEXT_CHARS, Ledger, StepRecord
from dagster_taskiq.core.messages import StepMessage, decode, peek_key, safe_text
from dagster_taskiq.core.observability import emit_metric, get_logger

if TYPE_CHECKING:
    from mypy_boto3_sns.client import SNSClient

SERVICE = "dlq-processor"
# Who recorded a rejection, in the ledger's rejected-messages table.
WORKER_ID = "dlq-processor"
SNS_SUBJECT_MAX_CHARS = 100
# SNS refuses a message over 256 KiB, counted in UTF-8 bytes: a dead letter whose alert
# is larger would fail on every try until the DLQ's retention ends.
SNS_MESSAGE_MAX_BYTES = 262_144
# What an alert quotes of any one value (a step key, a run id, a detail): enough to find
# it. The ledger and the dead letter itself keep the whole.
ALERT_FIELD_MAX_BYTES = 2_048
# Enough of an undecodable body to recognise it; the ledger keeps 2000 characters.
ALERT_BODY_EXCERPT_CHARS = 500

log = get_logger(SERVICE)


@dataclass(frozen=True)
class DeadLetter:
    """One message from the DLQ. ``receive_count`` is SQS's ApproximateReceiveCount."""

    message_id: str
    body: str
    receive_count: int


class Outcome(enum.StrEnum):
    MARKED = "marked"  # the step was live and is now DEAD_LETTERED
    # The executor had presumed it DEAD_LETTERED (it gave up waiting): confirmed now.
    CONFIRMED = "confirmed"
    ALREADY_TERMINAL = "already_terminal"  # finished before (a lost delete): left alone
    UNKNOWN_KEY = "unknown_key"  # a valid message with no ledger row
    MALFORMED = "malformed"  # not a step message this deployment sent


@dataclass(frozen=True)
class DeadLetterResult:
    """What ``process`` did.

    ``attempt`` is 0-based, as in the idempotency key. ``deliveries`` is the ledger's count
    for the step, None when no row was involved.
    """

    outcome: Outcome
    idempotency_key: str | None
    run_id: str | None
    step_key: str | None
    attempt: int | None
    deliveries: int | None
    alerted: bool
    detail: str


class AlertPublisher(Protocol):
    def publish(self, subject: str, message: str) -> None: ...


class SnsAlerts:
    """Alerts to an SNS topic. Errors (botocore's ClientError, BotoCoreError) propagate."""

    def __init__(self, client: SNSClient, topic_arn: str) -> None:
        self.client = client
        self.topic_arn = topic_arn

    def __repr__(self) -> str:
        return f"SnsAlerts({self.topic_arn})"

    def publish(self, subject: str, message: str) -> None:
        self.client.publish(
            TopicArn=self.topic_arn,
            Subject=sns_subject(subject),
            Message=clip(message, SNS_MESSAGE_MAX_BYTES),
        )


def sns_subject(text: str) -> str:
    """SNS refuses subjects that are not printable ASCII on one line, or over 100 chars."""
    one_line = " ".join(text.split())
    ascii_only = "".join(ch if " " <= ch <= "~" else "?" for ch in one_line)
    if len(ascii_only) > SNS_SUBJECT_MAX_CHARS:
        return ascii_only[: SNS_SUBJECT_MAX_CHARS - 3] + "..."
    return ascii_only or "dagster-taskiq alert"


def clip(text: str, max_bytes: int) -> str:
    """``text`` in at most ``max_bytes`` of UTF-8, cut with a note that says so.

    Never splits a character; lone surrogates and NUL become U+FFFD, so the result
    always encodes.
    """
    clean = safe_text(text, len(text))
    data = clean.encode()
    if len(data) <= max_bytes:
        return clean
    note = f"... [{len(clean)} characters, {len(data)} bytes, cut]"
    room = max_bytes - len(note)  # the note is ASCII
    if room <= 0:
        return note[:max_bytes]
    return data[:room].decode("utf-8", "ignore") + note


def _q(value: object) -> str:
    """A value quoted in an alert's text, bounded."""
    return clip(str(value), ALERT_FIELD_MAX_BYTES)


def _alert_text(paragraphs: list[str], fields: dict[str, Any]) -> str:
    """People's paragraphs, then one JSON line for machines, in one SNS message.

    Every string field is bounded, so the JSON line stays whole; the paragraphs (whose
    values callers bound with ``_q``) are cut to what room the line leaves.
    """
    bounded = {k: _q(v) if isinstance(v, str) else v for k, v in fields.items()}
    line = json.dumps(bounded, sort_keys=True)
    room = SNS_MESSAGE_MAX_BYTES - len(line.encode()) - 2
    return clip("\n\n".join(paragraphs), room) + "\n\n" + line


def _storable(text: str) -> str:
    """Text PostgreSQL accepts.

    JSON escapes can produce NUL (which a text column refuses) or lone surrogates (which
    the driver cannot encode); a rejection that can never be stored would be retried for
    ever.
    """
    return safe_text(text, REJECTION_TEXT_CHARS)


class DeadLetterProcessor:
    """Marks dead-lettered steps in the ledger and alerts on the transition.

    ``LedgerUnavailable`` and alert errors propagate so that the Lambda reports the record
    as failed and SQS delivers it again; every path is safe to repeat.
    """

    def __init__(
        self,
        ledger: Ledger,
        alerts: AlertPublisher,
        *,
        signing_key: str | None,
        dagster_ui_url: str | None,
        max_message_bytes: int = 1_048_576,
    ) -> None:
        self.ledger = ledger
        self._alerts = alerts
        self._signing_key = signing_key
        self._dagster_ui_url = dagster_ui_url.rstrip("/") if dagster_ui_url else None
        self._max_message_bytes = max_message_bytes

    def __repr__(self) -> str:
        return f"DeadLetterProcessor({self.ledger!r}, {self._alerts!r})"

    def process(self, letter: DeadLetter) -> DeadLetterResult:
        try:
            # Authenticated first: a forged message must never mark a real step.
            message = decode(
                letter.body, signing_key=self._signing_key, max_bytes=self._max_message_bytes
            )
        except MessageRejected as e:
            return self._malformed(letter, e.reason, e.detail)
        key = message.idempotency_key
        row = self.ledger.get(key)
        if row is None:
            return self._unknown_key(letter, message)
        if row.payload_hash != message.payload_hash:
            # Workers reject such a message (it is not the one launched under this key) and
            # it dies in the DLQ while the real step may be running fine: leave the row be.
            # The hash of a row never changes, so checking before marking is not a race.
            return self._mismatch(letter, message, row)
        # A row the executor presumed DEAD_LETTERED (the processor was late) is confirmed:
        # that transition, once, is what alerts.
        confirming = row.presumed_dead_letter
        if not row.status.is_terminal or confirming:
            # The ledger counts the deliveries workers claimed. SQS's receive count carries
            # over into the DLQ and includes this processor's own receives, so it is only a
            # fallback (less the DLQ's receive) for a step no worker ever claimed.
            deliveries = row.deliveries or max(1, letter.receive_count - 1)
            reason = f"dead-lettered after {deliveries} deliveries (no worker could complete it)"
            if confirming:
                reason += "; the executor had presumed it when the DLQ processor was late"
            if self.ledger.dead_letter(key, deliveries=deliveries, reason=reason):
                return self._marked(letter, message, deliveries, confirmed=confirming)
            # It became terminal meanwhile (a worker finished it).
            row = self.ledger.get(key)
            if row is None:
                return self._unknown_key(letter, message)
        return self._already_terminal(message, row)

    # -- outcomes ------------------------------------------------------------------------

    def _marked(
        self, letter: DeadLetter, message: StepMessage, deliveries: int, *, confirmed: bool = False
    ) -> DeadLetterResult:
        emit_metric("StepsDeadLettered", 1)
        # From here on nothing may raise: a retried record would find the row
        # DEAD_LETTERED, count as ALREADY_TERMINAL and never alert. So a failed read-back
        # falls back to the count known before the mark, and a failed alert is logged
        # and reported (alerted=False) instead of failing the record. The mark itself,
        # which the executor acts on, has happened either way, and StepsDeadLettered
        # counts it for alarms that do not depend on SNS.
        try:
            record = self.ledger.get(message.idempotency_key)
        except LedgerUnavailable as e:
            log.warning("Could not read the dead-lettered row back", extra={"error": str(e)})
            record = None
        if record is not None:
            deliveries = record.deliveries
        subject = f"Dagster step dead-lettered: {message.step_key} in run {message.run_id}"
        link = f"{self._dagster_ui_url}/runs/{message.run_id}" if self._dagster_ui_url else None
        if confirmed:
            marked = (
                "The executor had already failed the step in Dagster, presuming it "
                "dead-lettered when this processor had not marked it in time; the ledger now "
                "confirms it. If this processor was down or failing, check its errors and "
                "its event source."
            )
        else:
            marked = "It is marked DEAD_LETTERED in the ledger, so the run fails the step."
        paragraphs = [
            f'Step "{_q(message.step_key)}" of run {_q(message.run_id)} (attempt '
            f"{message.attempt + 1}) was dead-lettered after {deliveries} deliveries: no worker "
            "could complete it, typically because the op crashes or kills its worker every "
            f"time. {marked}",
            f"Run: {_q(link or message.run_id)}\n"
            f"Step key: {_q(message.step_key)}\n"
            f"Attempt: {message.attempt + 1}\n"
            f"Deliveries: {deliveries}\n"
            f"Idempotency key: {_q(message.idempotency_key)}\n"
            f"Dead-letter message id: {_q(letter.message_id)}",
        ]
        fields = self._fields("step_dead_lettered", letter, message)
        fields.update(deliveries=deliveries, dagster_run_url=link)
        if confirmed:
            fields.update(presumed_by_executor=True)
        verb = "confirmed" if confirmed else "marked"
        detail = f"{verb} DEAD_LETTERED after {deliveries} deliveries"
        try:
            self._alerts.publish(subject, _alert_text(paragraphs, fields))
            alerted = True
        except Exception as e:
            log.exception(
                "The step is marked DEAD_LETTERED but the alert could not be published",
                extra={"idempotency_key": message.idempotency_key},
            )
            alerted = False
            detail += f"; the alert could not be published ({type(e).__name__}: {e})"
        outcome = Outcome.CONFIRMED if confirmed else Outcome.MARKED
        return self._result(outcome, message, deliveries, alerted=alerted, detail=detail)

    def _already_terminal(self, message: StepMessage, row: StepRecord) -> DeadLetterResult:
        emit_metric("DeadLettersIgnored", 1)
        return self._result(
            Outcome.ALREADY_TERMINAL,
            message,
            row.deliveries,
            alerted=False,
            detail=f"the step is already {row.status}; left alone",
        )

    def _malformed(self, letter: DeadLetter, reason: str, detail: str) -> DeadLetterResult:
        key = peek_key(letter.body)
        excerpt = letter.body[:ALERT_BODY_EXCERPT_CHARS]
        paragraphs = [
            f"Malformed dead letter {_q(letter.message_id)} ({reason}): {_q(detail)}. It was "
            "never executed; the ledger records it among the rejected messages with reason "
            f"dead_letter_{reason}.",
            # repr: the body is untrusted, and must not smuggle control characters.
            f"Idempotency key (unverified): {_q(repr(key))}\n"
            f"Body (first {ALERT_BODY_EXCERPT_CHARS} characters): {excerpt!r}",
        ]
        fields = {
            "alert": "malformed_dead_letter",
            "reason": reason,
            "detail": detail,
            "message_id": letter.message_id,
            "receive_count": letter.receive_count,
            "unverified_idempotency_key": key,
        }
        self._reject(
            letter,
            reason=reason,
            detail=detail,
            key=key,
            subject=f"Malformed dead letter {letter.message_id} ({reason})",
            text=_alert_text(paragraphs, fields),
        )
        return DeadLetterResult(
            outcome=Outcome.MALFORMED,
            idempotency_key=key,
            run_id=None,
            step_key=None,
            attempt=None,
            deliveries=None,
            alerted=True,
            detail=f"{reason}: {detail}",
        )

    def _mismatch(
        self, letter: DeadLetter, message: StepMessage, row: StepRecord
    ) -> DeadLetterResult:
        detail = (
            f"the payload differs from the one launched under {message.idempotency_key}; "
            f"the step ({row.status}) was left alone"
        )
        paragraphs = [
            f"Malformed dead letter {_q(letter.message_id)} (mismatch): it names step "
            f'"{_q(message.step_key)}" of run {_q(message.run_id)} (attempt {message.attempt + 1}) '
            "but carries different step arguments than the ones launched under that key, so "
            f"it is not that step's message. The step ({row.status}) was left alone.",
        ]
        self._reject(
            letter,
            reason="mismatch",
            detail=detail,
            key=message.idempotency_key,
            subject=f"Malformed dead letter {letter.message_id} (mismatch)",
            text=_alert_text(paragraphs, self._fields("malformed_dead_letter", letter, message)),
        )
        return self._result(Outcome.MALFORMED, message, None, alerted=True, detail=detail)

    def _unknown_key(self, letter: DeadLetter, message: StepMessage) -> DeadLetterResult:
        detail = "no ledger row for this idempotency key: never launched, or its row expired"
        paragraphs = [
            f'Dead letter {_q(letter.message_id)} is for step "{_q(message.step_key)}" of run '
            f"{_q(message.run_id)} (attempt {message.attempt + 1}), which has no ledger row: it "
            "was never launched by an executor, or its row expired. Nothing was marked.",
        ]
        self._reject(
            letter,
            reason="unknown_key",
            detail=detail,
            key=message.idempotency_key,
            subject=f"Dead letter for unknown step {message.step_key} in run {message.run_id}",
            text=_alert_text(paragraphs, self._fields("unknown_dead_letter", letter, message)),
        )
        return self._result(Outcome.UNKNOWN_KEY, message, None, alerted=True, detail=detail)

    # -- helpers -------------------------------------------------------------------------

    def _reject(
        self,
        letter: DeadLetter,
        *,
        reason: str,
        detail: str,
        key: str | None,
        subject: str,
        text: str,
    ) -> None:
        """Record, then alert: both are safe to repeat when the record is retried."""
        self.ledger.record_rejection(
            message_id=letter.message_id,
            reason=f"dead_letter_{reason}",
            detail=_storable(detail),
            body=_storable(letter.body),
            worker_id=WORKER_ID,
            idempotency_key=_storable(key) if key is not None else None,
        )
        self._alerts.publish(subject, text)
        # After the alert: a record retried because the alert failed is counted once.
        emit_metric("MalformedDeadLetters", 1)
        log.error(
            "Dead letter rejected",
            extra={"message_id": letter.message_id, "reason": reason, "detail": detail},
        )

    @staticmethod
    def _fields(alert: str, letter: DeadLetter, message: StepMessage) -> dict[str, Any]:
        return {
            "alert": alert,
            "idempotency_key": message.idempotency_key,
            "run_id": message.run_id,
            "step_key": message.step_key,
            "attempt": message.attempt,
            "message_id": letter.message_id,
            "receive_count": letter.receive_count,
        }

    @staticmethod
    def _result(
        outcome: Outcome,
        message: StepMessage,
        deliveries: int | None,
        *,
        alerted: bool,
        detail: str,
    ) -> DeadLetterResult:
        return DeadLetterResult(
            outcome=outcome,
            idempotency_key=message.idempotency_key,
            run_id=message.run_id,
            step_key=message.step_key,
            attempt=message.attempt,
            deliveries=deliveries,
            alerted=alerted,
            detail=detail,
        )
