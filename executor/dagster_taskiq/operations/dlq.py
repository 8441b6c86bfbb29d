"""``dagster-taskiq dlq``: the dead letters, decoded and joined to the ledger.

SQS has no way to read a message without receiving it. Listing receives every message of
the dead-letter queues with a short visibility timeout (``hold_seconds``) and gives each
back at once (visibility 0) when done: a message is invisible to the DLQ processor for at
most that long, and its receive count goes up by one. ``purge`` keeps the messages it
listed hidden while it asks, then deletes exactly those, by the receipt handles it got;
never PurgeQueue, which would also take letters that arrived meanwhile.

Most dead letters do not stay in the DLQ: the DLQ processor consumes them, marking the
step DEAD_LETTERED (or recording a malformed one among the rejected messages). Those are
listed from the ledger as ``recorded``, beside the ones still ``in_queue``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from dagster_taskiq.core.errors import ConfigurationError, MessageRejected, QueueUnavailable
from dagster_taskiq.core.ledger import (
    Ledger,
    StepRecord,
    rejected_messages,
    steps,
)
from dagster_taskiq.core.ledger import (
    Status as StepStatus,
)
from dagster_taskiq.core.messages import decode, peek_key
from dagster_taskiq.core.sqs import ReceivedMessage, SqsQueue
from dagster_taskiq.operations.ledger_reads import Rejection, interval, rejections_for
from dagster_taskiq.operations.target import Target

DEFAULT_HOLD_SECONDS = 30
PURGE_HOLD_SECONDS = 300
DEFAULT_LIMIT = 100
BODY_EXCERPT_CHARS = 2000
# Larger than any SQS message: decoding here only reads.
_MAX_BYTES = 4 * 1024 * 1024
# Deleting by receipt handle needs the message still hidden by this receive: past this
# margin before the hold ends, purge receives the listed messages again first.
_HOLD_MARGIN_SECONDS = 10


@dataclass
class DeadLetterView:
    """One dead letter: where it is, what it says, and what the ledger says of it."""

    message_id: str | None
    dlq_url: str | None  # None: recorded in the ledger, no longer in the DLQ
    reason: str  # why it is a dead letter, in words
    idempotency_key: str | None = None
    key_verified: bool = False  # decoded (and authenticated, with a signing key)
    run_id: str | None = None
    step_key: str | None = None
    attempt: int | None = None
    undecodable: str | None = None  # "forged: ..." when the message did not decode
    receive_count: int | None = None
    sent_at: str | None = None
    ledger_status: str | None = None
    ledger_deliveries: int | None = None
    ledger_worker: str | None = None
    ledger_error: str | None = None
    rejections: list[Rejection] = field(default_factory=list)
    body_excerpt: str | None = None


@dataclass
class HeldLetter:
    view: DeadLetterView
    received: ReceivedMessage


@dataclass
class Listing:
    """Dead letters received and held invisible until ``hold_deadline`` (time.monotonic)."""

    held: list[HeldLetter]
    hold_seconds: int
    hold_deadline: float
    queues: dict[str, SqsQueue]
    errors: list[str] = field(default_factory=list)

    @property
    def views(self) -> list[DeadLetterView]:
        return [h.view for h in self.held]

    def release(self, letters: Iterable[HeldLetter] | None = None) -> None:
        """Make the letters visible again now (all of them by default)."""
        for letter in self.held if letters is None else letters:
            try:
                self.queues[letter.received.queue_url].change_visibility(
                    letter.received.receipt_handle, 0
                )
            except QueueUnavailable as e:
                # It comes back by itself when the hold ends.
                self.errors.append(f"release of {letter.received.message_id}: {e}")


def _excerpt(body: str) -> str:
    """The body with the (large, opaque) step arguments left out, cut to a readable size."""
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        fields = None
    if isinstance(fields, dict) and isinstance(fields.get("step_args"), dict):
        data = fields["step_args"].get("data")
        size = len(data) if isinstance(data, str) else 0
        fields["step_args"] = {**fields["step_args"], "data": f"<{size} characters>"}
        body = json.dumps(fields, indent=2)
    return body if len(body) <= BODY_EXCERPT_CHARS else body[:BODY_EXCERPT_CHARS] + "..."


def explain(view: DeadLetterView, record: StepRecord | None, payload_matches: bool) -> str:
    """Why this letter is dead, from what is known of it."""
    if view.undecodable is not None:
        if view.rejections:
            return f"rejected, never executed ({view.rejections[-1].text})"
        return f"undecodable, never executed ({view.undecodable})"
    if record is None:
        return "no ledger row for its key: never launched by an executor, or its row expired"
    if not payload_matches:
        return "not the message launched under its key (different step arguments)"
    if record.status is StepStatus.DEAD_LETTERED:
        return record.error or "dead-lettered"
    if record.status.is_terminal:
        return f"its step already {record.status.value}: a delete was lost; harmless"
    return (
        f"delivered {record.deliveries} time(s) without completing; not marked by the DLQ "
        f"processor yet (step {record.status.value})"
    )


def describe_letter(
    received: ReceivedMessage,
    ledger: Ledger | None,
    signing_key: str | None,
    rejections: dict[str, list[Rejection]],
) -> DeadLetterView:
    view = DeadLetterView(
        message_id=received.message_id,
        dlq_url=received.queue_url,
        reason="",
        receive_count=received.receive_count,
        sent_at=(
            datetime.fromtimestamp(received.sent_timestamp_ms / 1000, UTC).isoformat(
                timespec="seconds"
            )
            if received.sent_timestamp_ms
            else None
        ),
        body_excerpt=_excerpt(received.body),
        rejections=rejections.get(received.message_id, []),
    )
    payload_hash = None
    try:
        message = decode(received.body, signing_key=signing_key, max_bytes=_MAX_BYTES)
    except MessageRejected as e:
        view.undecodable = f"{e.reason}: {e.detail}"
        view.idempotency_key = peek_key(received.body)
    else:
        view.idempotency_key = message.idempotency_key
        view.key_verified = True
        view.run_id, view.step_key, view.attempt = message.run_id, message.step_key, message.attempt
        payload_hash = message.payload_hash
    record = None
    if ledger is not None and view.idempotency_key:
        record = ledger.get(view.idempotency_key)
    if record is not None:
        view.ledger_status = record.status.value
        view.ledger_deliveries = record.deliveries
        view.ledger_worker = record.worker_id
        view.ledger_error = record.error
        if not view.key_verified:
            view.run_id, view.step_key, view.attempt = (
                record.run_id,
                record.step_key,
                record.attempt,
            )
    matches = record is None or payload_hash is None or record.payload_hash == payload_hash
    view.reason = explain(view, record, matches)
    return view


def peek_dead_letters(
    target: Target,
    ledger: Ledger | None,
    *,
    hold_seconds: int = DEFAULT_HOLD_SECONDS,
    limit: int = DEFAULT_LIMIT,
    dlq_urls: list[str] | None = None,
) -> Listing:
    """Receive up to ``limit`` dead letters, hidden for ``hold_seconds``, and describe them.
    The caller releases them (``Listing.release``) or deletes some (``delete_listed``)."""
    urls = dlq_urls if dlq_urls is not None else target.dead_letter_queues()
    started = time.monotonic()
    listing = Listing(
        held=[],
        hold_seconds=hold_seconds,
        hold_deadline=started + hold_seconds,
        queues={url: SqsQueue(url, client=target.sqs) for url in urls},
    )
    received: list[ReceivedMessage] = []
    seen: set[str] = set()
    for url, queue in listing.queues.items():
        try:
            # Enough once this many are in hand: no last, empty long poll to wait out.
            expected = queue.depth().visible
        except QueueUnavailable:
            expected = 0
        from_queue = 0
        while len(received) < limit and not (expected and from_queue >= expected):
            try:
                batch = queue.receive(
                    max_messages=min(10, limit - len(received)),
                    wait_seconds=1,  # asks every SQS server; a short poll may miss some
                    visibility_timeout=hold_seconds,
                )
            except QueueUnavailable as e:
                listing.errors.append(f"{url}: {e}")
                break
            fresh = [m for m in batch if m.message_id not in seen]
            if not fresh:
                break
            seen.update(m.message_id for m in fresh)
            received.extend(fresh)
            from_queue += len(fresh)
    key: str | None = None
    if received:
        try:
            key = target.message_signing_key()
        except ConfigurationError as e:
            listing.errors.append(f"signatures not checked: {e}")
    rejections: dict[str, list[Rejection]] = {}
    if ledger is not None and received:
        try:
            for rejection in rejections_for(ledger, message_ids=seen):
                rejections.setdefault(rejection.message_id, []).append(rejection)
        except Exception as e:  # the letters are still worth showing without it
            listing.errors.append(f"ledger: {type(e).__name__}: {e}")
    for message in received:
        try:
            view = describe_letter(message, ledger, key, rejections)
        except Exception as e:
            listing.errors.append(f"ledger: {type(e).__name__}: {e}")
            view = describe_letter(message, None, key, rejections)
        listing.held.append(HeldLetter(view=view, received=message))
    return listing


@dataclass
class PurgeResult:
    deleted: list[str]
    missing: list[str]  # listed, but gone or no longer ours to delete
    errors: list[str]


def delete_listed(listing: Listing, letters: list[HeldLetter]) -> PurgeResult:
    """Delete exactly ``letters``, which ``listing`` received. Past their hold, the listed
    message ids are received again (others are given back) and deleted by the new handles."""
    result = PurgeResult(deleted=[], missing=[], errors=[])
    if time.monotonic() > listing.hold_deadline - _HOLD_MARGIN_SECONDS:
        letters = _receive_again(listing, letters, result)
    for letter in letters:
        queue = listing.queues[letter.received.queue_url]
        try:
            queue.delete(letter.received.receipt_handle)
            result.deleted.append(letter.received.message_id)
        except QueueUnavailable as e:
            result.errors.append(f"{letter.received.message_id}: {e}")
    return result


def _receive_again(
    listing: Listing, letters: list[HeldLetter], result: PurgeResult
) -> list[HeldLetter]:
    wanted = {letter.received.message_id: letter for letter in letters}
    found: dict[str, HeldLetter] = {}
    for url in {letter.received.queue_url for letter in letters}:
        queue = listing.queues[url]
        while True:
            try:
                batch = queue.receive(
                    max_messages=10, wait_seconds=1, visibility_timeout=listing.hold_seconds
                )
            except QueueUnavailable as e:
                result.errors.append(f"{url}: {e}")
                break
            if not batch or all(m.message_id in found for m in batch):
                break
            for message in batch:
                if message.message_id in wanted:
                    found[message.message_id] = HeldLetter(wanted[message.message_id].view, message)
                else:
                    with contextlib.suppress(QueueUnavailable):  # back when this hold ends
                        queue.change_visibility(message.receipt_handle, 0)
    result.missing = [message_id for message_id in wanted if message_id not in found]
    return list(found.values())


def select(
    listing: Listing,
    *,
    run_id: str | None = None,
    message_ids: tuple[str, ...] = (),
) -> tuple[list[HeldLetter], list[HeldLetter]]:
    """(chosen, others) of the listed letters."""

    def chosen(letter: HeldLetter) -> bool:
        if message_ids and letter.view.message_id not in message_ids:
            return False
        return not (run_id and letter.view.run_id != run_id)

    picked = [letter for letter in listing.held if chosen(letter)]
    return picked, [letter for letter in listing.held if not chosen(letter)]


def recorded_dead_letters(
    ledger: Ledger, *, since_seconds: float, run_id: str | None = None, limit: int = 200
) -> list[DeadLetterView]:
    """Dead letters the DLQ processor has already consumed: steps it marked DEAD_LETTERED,
    and malformed letters it recorded among the rejected messages."""
    window = sa.func.now() - interval(since_seconds)
    marked = sa.select(steps).where(
        steps.c.status == StepStatus.DEAD_LETTERED, steps.c.finished_at >= window
    )
    if run_id:
        marked = marked.where(steps.c.run_id == run_id)
    malformed = sa.select(rejected_messages).where(
        rejected_messages.c.reason.like("dead\\_letter\\_%", escape="\\"),
        rejected_messages.c.last_seen_at >= window,
    )
    with ledger.transaction() as conn:
        rows = conn.execute(marked.order_by(steps.c.finished_at.desc()).limit(limit)).mappings()
        views = [
            DeadLetterView(
                message_id=None,
                dlq_url=None,
                reason=row["error"] or "dead-lettered",
                idempotency_key=row["idempotency_key"],
                key_verified=True,
                run_id=row["run_id"],
                step_key=row["step_key"],
                attempt=row["attempt"],
                ledger_status=row["status"],
                ledger_deliveries=row["deliveries"],
                ledger_worker=row["worker_id"],
                ledger_error=row["error"],
                sent_at=row["finished_at"].isoformat(timespec="seconds"),
            )
            for row in rows
        ]
        for row in conn.execute(
            malformed.order_by(rejected_messages.c.last_seen_at.desc()).limit(limit)
        ).mappings():
            rejection = Rejection.from_row(row)
            key = rejection.idempotency_key
            if run_id and not (key or "").startswith(f"{run_id}:"):
                continue
            views.append(
                DeadLetterView(
                    message_id=rejection.message_id,
                    dlq_url=None,
                    reason=f"rejected by the DLQ processor ({rejection.text})",
                    idempotency_key=key,
                    undecodable=(
                        f"{rejection.reason.removeprefix('dead_letter_')}: {rejection.detail}"
                    ),
                    receive_count=rejection.receive_count,
                    sent_at=rejection.last_seen_at.isoformat(timespec="seconds"),
                    rejections=[rejection],
                    body_excerpt=_excerpt(rejection.body_excerpt),
                )
            )
    return views


def find_letter(
    target: Target,
    ledger: Ledger | None,
    message_id: str,
    *,
    hold_seconds: int = DEFAULT_HOLD_SECONDS,
    since_seconds: float = 14 * 86400,
) -> tuple[DeadLetterView | None, list[str]]:
    """One dead letter by message id, in the DLQs (given back at once), else among the
    letters the DLQ processor recorded; and the errors met on the way."""
    listing = peek_dead_letters(target, ledger, hold_seconds=hold_seconds, limit=1000)
    listing.release()
    for view in listing.views:
        if view.message_id == message_id:
            return view, listing.errors
    if ledger is not None:
        for view in recorded_dead_letters(ledger, since_seconds=since_seconds, limit=1000):
            if view.message_id == message_id:
                return view, listing.errors
    return None, listing.errors
