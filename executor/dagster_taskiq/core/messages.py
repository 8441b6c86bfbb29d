"""The step message: what the executor puts on the queue and a worker takes off it.

Versioned JSON. The Dagster step arguments travel as an opaque string (Dagster's own
serialization, compressed when large) so that this module, which the Lambdas import,
stays free of dagster. Nothing secret travels: the executor strips the InstanceRef before
serializing, and workers use their own configured Dagster instance.

Decoding never raises anything but ``MessageRejected``: a worker records the reason and
lets the message go to the dead-letter queue; it never executes it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from dagster_taskiq.core.errors import MessageRejected, MessageTooLarge

SCHEMA_VERSION = 1
ENCODING_JSON = "json"
ENCODING_ZLIB = "zlib+base64"
# Step arguments above this size are compressed; most are far below it.
COMPRESS_ABOVE_BYTES = 8_192
# The most a message's step arguments may inflate to. A small compressed body can inflate
# to gigabytes; workers stop inflating at this bound. Real step arguments are kilobytes.
DEFAULT_MAX_STEP_ARGS_BYTES = 8 * 1024 * 1024

RejectReason = Literal["malformed", "unknown_version", "forged", "oversized"]


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def safe_text(value: str, limit: int) -> str:
    """``value`` made fit for a database, a log line or an alert: lone surrogates (which
    JSON escapes can carry and no UTF-8 encoder takes) and NUL (which PostgreSQL text
    refuses) become U+FFFD, and text longer than ``limit`` characters is cut, saying so.
    The result is never longer than ``limit``, and safe_text of it is itself."""
    text = _UNSTORABLE.sub("\ufffd", value)
    if len(text) <= limit:
        return text
    note = f"... [{len(text)} characters, cut]"
    return text[: max(0, limit - len(note))] + note[: max(0, limit)]


def idempotency_key(run_id: str, step_key: str, attempt: int) -> str:
    return f"{run_id}:{step_key}:{attempt}"


def payload_hash(step_args: str) -> str:
    return hashlib.sha256(step_args.encode()).hexdigest()


@dataclass(frozen=True)
class StepMessage:
    """One attempt of one step. ``step_args`` is a serialized Dagster ExecuteStepArgs."""

    run_id: str
    step_key: str
    attempt: int
    step_args: str
    lease_seconds: int
    enqueued_at: str
    schema: int = SCHEMA_VERSION

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.run_id, self.step_key, self.attempt)

    @property
    def payload_hash(self) -> str:
        return payload_hash(self.step_args)

    @classmethod
    def new(
        cls, run_id: str, step_key: str, attempt: int, step_args: str, lease_seconds: int
    ) -> StepMessage:
        return cls(
            run_id=run_id,
            step_key=step_key,
            attempt=attempt,
            step_args=step_args,
            lease_seconds=lease_seconds,
            enqueued_at=datetime.now(UTC).isoformat(),
        )


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _sign(fields: dict[str, Any], key: str) -> str:
    return hmac.new(key.encode(), _canonical(fields), hashlib.sha256).hexdigest()


def encode(
    message: StepMessage,
    *,
    signing_key: str | None,
    max_bytes: int,
    max_step_args_bytes: int = DEFAULT_MAX_STEP_ARGS_BYTES,
) -> str:
    """The message body to send. Raises MessageTooLarge rather than truncating."""
    # Refuse here what decode() refuses, so that what is sent can be received.
    for name, stored in (("run_id", True), ("step_key", True), ("step_args", False)):
        problem = _text_problem(getattr(message, name), stored=stored)
        if problem:
            raise ValueError(f"{name} {problem}")
    raw = message.step_args.encode()
    if len(raw) > max_step_args_bytes:
        raise MessageTooLarge(
            f"The step arguments of step {message.step_key!r} of run {message.run_id} are "
            f"{len(raw)} bytes, more than the {max_step_args_bytes} bytes a worker accepts. "
            "Reduce what the step carries in its run config or known state."
        )
    if len(raw) > COMPRESS_ABOVE_BYTES:
        args_field = {
            "encoding": ENCODING_ZLIB,
            "data": base64.b64encode(zlib.compress(raw, 6)).decode(),
        }
    else:
        args_field = {"encoding": ENCODING_JSON, "data": message.step_args}
    fields: dict[str, Any] = {
        "schema": message.schema,
        "idempotency_key": message.idempotency_key,
        "run_id": message.run_id,
        "step_key": message.step_key,
        "attempt": message.attempt,
        "lease_seconds": message.lease_seconds,
        "enqueued_at": message.enqueued_at,
        "payload_sha256": message.payload_hash,
        "step_args": args_field,
    }
    if signing_key:
        fields["signature"] = _sign(fields, signing_key)
    body = json.dumps(fields, separators=(",", ":"))
    size = len(body.encode())
    if size > max_bytes:
        raise MessageTooLarge(
            f"The message for step {message.step_key!r} of run {message.run_id} is {size} bytes "
            f"after compression, more than the limit of {max_bytes} bytes. Reduce what the step "
            "carries in its run config or known state (large config values belong in resources "
            "or storage), or raise `max_message_bytes` if your queue allows larger messages "
            "(SQS allows up to 1048576)."
        )
    return body


def _require(fields: dict[str, Any], name: str, kind: type) -> Any:
    value = fields.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise MessageRejected("malformed", f"field {name!r} is missing or not a {kind.__name__}")
    if isinstance(value, str):
        _require_text(value, name, stored=True)
    return value


def _text_problem(value: str, *, stored: bool) -> str | None:
    """Why ``value`` cannot travel, or None. JSON may carry lone surrogates ("\\ud800"),
    which neither hashing nor PostgreSQL take; a value the ledger stores may not hold NUL,
    which PostgreSQL text cannot."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if stored and "\x00" in value:
        return "contains a NUL character"
    return None


def _require_text(value: str, name: str, *, stored: bool) -> None:
    problem = _text_problem(value, stored=stored)
    if problem:
        raise MessageRejected("malformed", f"field {name!r} {problem}")


def decode(
    body: str,
    *,
    signing_key: str | None,
    max_bytes: int,
    max_step_args_bytes: int = DEFAULT_MAX_STEP_ARGS_BYTES,
) -> StepMessage:
    """Parse, validate and authenticate a message body. Raises MessageRejected only.

    Compressed step arguments are inflated at most to ``max_step_args_bytes``: a body
    that would inflate further is rejected as oversized without inflating it further.
    """
    size = len(body.encode("utf-8", errors="replace"))
    if size > max_bytes:
        raise MessageRejected("oversized", f"{size} bytes is more than the limit of {max_bytes}")
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise MessageRejected("malformed", f"not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise MessageRejected("malformed", "not a JSON object")
    schema = fields.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise MessageRejected(
            "unknown_version", f"schema {schema!r}; this worker reads schema {SCHEMA_VERSION}"
        )
    if signing_key:
        signature = fields.pop("signature", None)
        if not isinstance(signature, str) or not hmac.compare_digest(
            signature.encode("utf-8", "surrogatepass"), _sign(fields, signing_key).encode()
        ):
            raise MessageRejected("forged", "the HMAC signature is missing or does not verify")
    run_id = _require(fields, "run_id", str)
    step_key = _require(fields, "step_key", str)
    attempt = _require(fields, "attempt", int)
    lease_seconds = _require(fields, "lease_seconds", int)
    enqueued_at = _require(fields, "enqueued_at", str)
    expected_hash = _require(fields, "payload_sha256", str)
    key = _require(fields, "idempotency_key", str)
    args_field = _require(fields, "step_args", dict)
    step_args = _decode_step_args(args_field, max_step_args_bytes)
    if attempt < 0 or lease_seconds <= 0:
        raise MessageRejected("malformed", "attempt must be >= 0 and lease_seconds > 0")
    message = StepMessage(
        run_id=run_id,
        step_key=step_key,
        attempt=attempt,
        step_args=step_args,
        lease_seconds=lease_seconds,
        enqueued_at=enqueued_at,
        schema=schema,
    )
    if key != message.idempotency_key:
        raise MessageRejected("malformed", f"idempotency key {key!r} does not match its fields")
    if expected_hash != message.payload_hash:
        raise MessageRejected("malformed", "payload hash does not match the step arguments")
    return message


def _decode_step_args(args_field: dict[str, Any], limit: int) -> str:
    encoding = args_field.get("encoding")
    data = args_field.get("data")
    if not isinstance(data, str):
        raise MessageRejected("malformed", "step_args.data is missing or not a string")
    if encoding == ENCODING_JSON:
        _require_text(data, "step_args.data", stored=False)
        if len(data) > limit:
            raise MessageRejected("oversized", f"step arguments exceed {limit} bytes")
        return data
    if encoding == ENCODING_ZLIB:
        try:
            return _inflate(base64.b64decode(data, validate=True), limit).decode()
        except (ValueError, zlib.error) as e:
            raise MessageRejected("malformed", f"step_args could not be decompressed: {e}") from e
    raise MessageRejected("malformed", f"unknown step_args encoding {encoding!r}")


_INFLATE_PIECE_BYTES = 64 * 1024


def _inflate(compressed: bytes, limit: int) -> bytes:
    """The inflated data, if it is at most ``limit`` bytes. It is measured first, a piece
    at a time, keeping nothing: data that would inflate beyond the bound (a bomb) costs a
    piece of memory, and data within it is then inflated once more, into its exact size."""
    inflater = zlib.decompressobj()
    size, pending = 0, compressed
    while not inflater.eof:
        piece = inflater.decompress(pending, _INFLATE_PIECE_BYTES)
        pending = inflater.unconsumed_tail
        if not piece and not pending:
            raise MessageRejected("malformed", "step_args could not be decompressed: truncated")
        size += len(piece)
        if size > limit:
            raise MessageRejected("oversized", f"step arguments inflate to more than {limit} bytes")
    return zlib.decompress(compressed, bufsize=max(size, 1))


def peek_key(body: str) -> str | None:
    """The idempotency key of a body that may not decode, for records and alerts."""
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        return None
    key = fields.get("idempotency_key") if isinstance(fields, dict) else None
    return key if isinstance(key, str) else None
