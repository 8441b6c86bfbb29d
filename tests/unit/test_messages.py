"""The step message contract: encoding, signing, compression, limits and rejection reasons."""

from __future__ import annotations

import base64
import json
import random
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dagster_taskiq.core.errors import MessageRejected, MessageTooLarge
from dagster_taskiq.core.messages import (
    COMPRESS_ABOVE_BYTES,
    ENCODING_JSON,
    ENCODING_ZLIB,
    SCHEMA_VERSION,
    StepMessage,
    decode,
    encode,
    idempotency_key,
    payload_hash,
    peek_key,
)

KEY = "test-signing-key"
OTHER_KEY = "another-signing-key"
MAX = 262_144
REQUIRED_FIELDS = (
    "run_id",
    "step_key",
    "attempt",
    "lease_seconds",
    "enqueued_at",
    "payload_sha256",
    "idempotency_key",
    "step_args",
)
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")


def _message(step_args: str = '{"step": "args"}', attempt: int = 0) -> StepMessage:
    return StepMessage.new(
        run_id="run-1234",
        step_key="compute.total",
        attempt=attempt,
        step_args=step_args,
        lease_seconds=120,
    )


def _fields(message: StepMessage | None = None, *, key: str | None = None) -> dict[str, Any]:
    body = encode(message or _message(), signing_key=key, max_bytes=MAX)
    fields: dict[str, Any] = json.loads(body)
    return fields


def _body(fields: dict[str, Any]) -> str:
    return json.dumps(fields, separators=(",", ":"))


def _rejected(body: str, *, key: str | None = None, max_bytes: int = MAX) -> MessageRejected:
    with pytest.raises(MessageRejected) as info:
        decode(body, signing_key=key, max_bytes=max_bytes)
    return info.value


def _wordy_text(n_bytes: int, seed: int = 7) -> str:
    """Random-ish but compressible text (what serialized step arguments look like)."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        word = f'"{rng.choice(WORDS)}_{rng.randint(0, 99)}": {rng.randint(0, 10**6)}, '
        parts.append(word)
        size += len(word)
    return "".join(parts)[:n_bytes]


# -- keys ------------------------------------------------------------------------------


def test_idempotency_key_format() -> None:
    assert idempotency_key("run-1", "a.b", 3) == "run-1:a.b:3"
    message = _message(attempt=2)
    assert message.idempotency_key == "run-1234:compute.total:2"


def test_payload_hash_is_sha256_hex_of_step_args() -> None:
    digest = payload_hash("abc")
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert _message("abc").payload_hash == digest
    assert payload_hash("abd") != digest


def test_new_stamps_schema_and_utc_time() -> None:
    message = _message()
    assert message.schema == SCHEMA_VERSION
    assert message.enqueued_at.endswith("+00:00")


# -- round trips -----------------------------------------------------------------------


def test_round_trip_without_signing() -> None:
    message = _message('{"hello": "wörld ✓"}', attempt=3)
    body = encode(message, signing_key=None, max_bytes=MAX)
    fields = json.loads(body)
    assert "signature" not in fields
    assert fields["step_args"] == {"encoding": ENCODING_JSON, "data": message.step_args}
    assert fields["idempotency_key"] == "run-1234:compute.total:3"
    assert fields["payload_sha256"] == message.payload_hash
    assert decode(body, signing_key=None, max_bytes=MAX) == message


def test_round_trip_with_signing() -> None:
    message = _message()
    body = encode(message, signing_key=KEY, max_bytes=MAX)
    signature = json.loads(body)["signature"]
    assert isinstance(signature, str)
    assert len(signature) == 64
    assert decode(body, signing_key=KEY, max_bytes=MAX) == message


def test_signature_depends_on_key_and_content() -> None:
    message = _message()
    first = _fields(message, key=KEY)["signature"]
    assert _fields(message, key=KEY)["signature"] == first
    assert _fields(message, key=OTHER_KEY)["signature"] != first
    assert _fields(_message("other args"), key=KEY)["signature"] != first


def test_signed_message_decodes_for_worker_without_key() -> None:
    message = _message()
    body = encode(message, signing_key=KEY, max_bytes=MAX)
    assert decode(body, signing_key=None, max_bytes=MAX) == message


# -- signing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("step_key", "compute.other"),
        ("attempt", 1),
        ("run_id", "run-9999"),
        ("lease_seconds", 99_999),
        ("enqueued_at", "2000-01-01T00:00:00+00:00"),
        ("payload_sha256", "0" * 64),
        ("idempotency_key", "run-1234:compute.total:7"),
    ],
)
def test_tampered_field_is_forged(field: str, value: Any) -> None:
    fields = _fields(key=KEY)
    # Sanity check: the untouched body re-serialized by the test verifies.
    assert decode(_body(fields), signing_key=KEY, max_bytes=MAX) == _message_from(fields)
    assert fields[field] != value
    fields[field] = value
    rejected = _rejected(_body(fields), key=KEY)
    assert rejected.reason == "forged"


def _message_from(fields: dict[str, Any]) -> StepMessage:
    return StepMessage(
        run_id=fields["run_id"],
        step_key=fields["step_key"],
        attempt=fields["attempt"],
        step_args=fields["step_args"]["data"],
        lease_seconds=fields["lease_seconds"],
        enqueued_at=fields["enqueued_at"],
        schema=fields["schema"],
    )


def test_tampered_step_key_with_consistent_key_is_still_forged() -> None:
    """An attacker who fixes up the derived fields still cannot pass without the key."""
    fields = _fields(key=KEY)
    fields["step_key"] = "evil.step"
    fields["idempotency_key"] = idempotency_key(fields["run_id"], "evil.step", fields["attempt"])
    assert _rejected(_body(fields), key=KEY).reason == "forged"
    # Without a key, the same consistent body is accepted: only the signature protects it.
    fields.pop("signature")
    assert decode(_body(fields), signing_key=None, max_bytes=MAX).step_key == "evil.step"


def test_tampered_step_args_data_is_forged() -> None:
    fields = _fields(key=KEY)
    fields["step_args"]["data"] = '{"step": "evil"}'
    fields["payload_sha256"] = payload_hash('{"step": "evil"}')
    assert _rejected(_body(fields), key=KEY).reason == "forged"


def test_added_field_is_forged() -> None:
    fields = _fields(key=KEY)
    fields["extra"] = "smuggled"
    assert _rejected(_body(fields), key=KEY).reason == "forged"


def test_unsigned_message_is_forged_when_worker_has_key() -> None:
    body = encode(_message(), signing_key=None, max_bytes=MAX)
    rejected = _rejected(body, key=KEY)
    assert rejected.reason == "forged"
    assert "signature" in rejected.detail


def test_message_signed_with_other_key_is_forged() -> None:
    body = encode(_message(), signing_key=OTHER_KEY, max_bytes=MAX)
    assert _rejected(body, key=KEY).reason == "forged"


@pytest.mark.parametrize("signature", [None, 123, ["abc"], "", "not-hex"])
def test_bad_signature_values_are_forged(signature: Any) -> None:
    fields = _fields(key=KEY)
    fields["signature"] = signature
    assert _rejected(_body(fields), key=KEY).reason == "forged"


@pytest.mark.parametrize("signature", ["\x80", "é" * 64, "✓"])
def test_non_ascii_signature_is_forged_not_raised(signature: str) -> None:
    fields = _fields(key=KEY)
    fields["signature"] = signature
    assert _rejected(_body(fields), key=KEY).reason == "forged"


def test_empty_signing_key_means_unsigned() -> None:
    body = encode(_message(), signing_key="", max_bytes=MAX)
    assert "signature" not in json.loads(body)
    assert decode(body, signing_key="", max_bytes=MAX) == _message_from(json.loads(body))


# -- compression -----------------------------------------------------------------------


def test_large_step_args_are_compressed_and_round_trip() -> None:
    step_args = _wordy_text(50_000)
    assert len(step_args.encode()) > COMPRESS_ABOVE_BYTES
    message = _message(step_args)
    body = encode(message, signing_key=KEY, max_bytes=MAX)
    assert len(body.encode()) < len(step_args.encode())
    args_field = json.loads(body)["step_args"]
    assert args_field["encoding"] == ENCODING_ZLIB
    assert zlib.decompress(base64.b64decode(args_field["data"])).decode() == step_args
    assert decode(body, signing_key=KEY, max_bytes=MAX) == message


def test_compression_threshold_is_in_bytes() -> None:
    at_limit = "x" * COMPRESS_ABOVE_BYTES
    over_limit = "x" * (COMPRESS_ABOVE_BYTES + 1)
    assert _fields(_message(at_limit))["step_args"]["encoding"] == ENCODING_JSON
    assert _fields(_message(over_limit))["step_args"]["encoding"] == ENCODING_ZLIB
    # Multi-byte characters: fewer characters than the threshold, more bytes.
    multibyte = "é" * (COMPRESS_ABOVE_BYTES // 2 + 1)
    assert len(multibyte) < COMPRESS_ABOVE_BYTES
    fields = _fields(_message(multibyte))
    assert fields["step_args"]["encoding"] == ENCODING_ZLIB
    assert decode(_body(fields), signing_key=None, max_bytes=MAX).step_args == multibyte


# -- size limits -----------------------------------------------------------------------


def test_encode_raises_message_too_large_with_byte_counts() -> None:
    message = _message()
    size = len(encode(message, signing_key=KEY, max_bytes=MAX).encode())
    assert encode(message, signing_key=KEY, max_bytes=size)  # exactly at the limit is fine
    with pytest.raises(MessageTooLarge) as info:
        encode(message, signing_key=KEY, max_bytes=size - 1)
    text = str(info.value)
    assert f"{size} bytes" in text
    assert f"{size - 1} bytes" in text
    assert "compute.total" in text
    assert "run-1234" in text


def test_encode_too_large_after_compression() -> None:
    # Incompressible: random bytes, base64 encoded, so compression cannot save it.
    rng = random.Random(11)
    step_args = base64.b64encode(rng.randbytes(30_000)).decode()
    with pytest.raises(MessageTooLarge):
        encode(_message(step_args), signing_key=None, max_bytes=20_000)


def test_decode_oversized_body() -> None:
    body = encode(_message(), signing_key=None, max_bytes=MAX)
    size = len(body.encode())
    assert decode(body, signing_key=None, max_bytes=size) == _message_from(json.loads(body))
    rejected = _rejected(body, max_bytes=size - 1)
    assert rejected.reason == "oversized"
    assert str(size) in rejected.detail


def test_decode_size_is_measured_in_bytes_not_characters() -> None:
    body = "é" * 100  # 100 characters, 200 bytes
    assert _rejected(body, max_bytes=150).reason == "oversized"
    assert _rejected(body, max_bytes=200).reason == "malformed"


def test_oversized_is_checked_before_parsing() -> None:
    assert _rejected("x" * 100, max_bytes=10).reason == "oversized"


# -- malformed -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    ["", "not json", "{", '{"schema": 1', "\x00", "[" * 100_000 + "]" * 100_000],
    ids=["empty", "text", "open-brace", "truncated", "nul", "deep-nesting"],
)
def test_not_json_is_malformed(body: str) -> None:
    rejected = _rejected(body, max_bytes=10_000_000)
    assert rejected.reason == "malformed"


@pytest.mark.parametrize("body", ["[1, 2, 3]", '"a string"', "42", "null", "true"])
def test_json_that_is_not_an_object_is_malformed(body: str) -> None:
    assert _rejected(body).reason == "malformed"
    assert _rejected(body, key=KEY).reason == "malformed"


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_missing_field_is_malformed(field: str) -> None:
    fields = _fields()
    del fields[field]
    rejected = _rejected(_body(fields))
    assert rejected.reason == "malformed"
    assert field in rejected.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attempt", True),
        ("attempt", False),
        ("attempt", "0"),
        ("attempt", 0.0),
        ("attempt", None),
        ("lease_seconds", True),
        ("lease_seconds", "120"),
        ("lease_seconds", 120.5),
        ("run_id", 5),
        ("run_id", None),
        ("step_key", ["compute.total"]),
        ("enqueued_at", 0),
        ("payload_sha256", None),
        ("idempotency_key", 1),
        ("step_args", "the args"),
        ("step_args", ["json", "data"]),
    ],
)
def test_wrong_types_are_malformed(field: str, value: Any) -> None:
    fields = _fields()
    fields[field] = value
    rejected = _rejected(_body(fields))
    assert rejected.reason == "malformed"
    assert field in rejected.detail


@pytest.mark.parametrize(("field", "value"), [("attempt", -1), ("lease_seconds", 0)])
def test_out_of_range_numbers_are_malformed(field: str, value: int) -> None:
    fields = _fields()
    fields[field] = value
    fields["idempotency_key"] = idempotency_key(
        fields["run_id"], fields["step_key"], fields["attempt"]
    )
    assert _rejected(_body(fields)).reason == "malformed"


@pytest.mark.parametrize(
    "args_field",
    [
        {"encoding": ENCODING_JSON},
        {"encoding": ENCODING_JSON, "data": 5},
        {"encoding": ENCODING_JSON, "data": {"nested": "object"}},
        {"encoding": ENCODING_ZLIB, "data": "!!! not base64 !!!"},
        {"encoding": ENCODING_ZLIB, "data": base64.b64encode(b"not zlib data").decode()},
        {"encoding": ENCODING_ZLIB, "data": base64.b64encode(zlib.compress(b"\xff\xfe")).decode()},
        {"encoding": "gzip", "data": "abc"},
        {"encoding": None, "data": "abc"},
        {"data": "abc"},
    ],
    ids=[
        "no-data",
        "int-data",
        "object-data",
        "bad-base64",
        "not-zlib",
        "not-utf8",
        "unknown-encoding",
        "null-encoding",
        "missing-encoding",
    ],
)
def test_bad_step_args_are_malformed(args_field: dict[str, Any]) -> None:
    fields = _fields()
    fields["step_args"] = args_field
    assert _rejected(_body(fields)).reason == "malformed"


def test_idempotency_key_not_matching_fields_is_malformed() -> None:
    fields = _fields()
    fields["idempotency_key"] = "run-1234:compute.total:1"
    rejected = _rejected(_body(fields))
    assert rejected.reason == "malformed"
    assert "idempotency key" in rejected.detail


def test_changed_attempt_without_signing_is_malformed() -> None:
    fields = _fields()
    fields["attempt"] = 5
    assert _rejected(_body(fields)).reason == "malformed"


def test_payload_hash_mismatch_is_malformed() -> None:
    fields = _fields()
    fields["step_args"]["data"] = '{"step": "edited"}'
    rejected = _rejected(_body(fields))
    assert rejected.reason == "malformed"
    assert "hash" in rejected.detail


def test_payload_hash_mismatch_in_compressed_args_is_malformed() -> None:
    fields = _fields(_message(_wordy_text(20_000)))
    assert fields["step_args"]["encoding"] == ENCODING_ZLIB
    edited = _wordy_text(20_000, seed=99)
    fields["step_args"]["data"] = base64.b64encode(zlib.compress(edited.encode())).decode()
    assert _rejected(_body(fields)).reason == "malformed"


# -- versions --------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [2, 0, "1", None])
def test_other_schema_is_unknown_version(schema: Any) -> None:
    fields = _fields()
    fields["schema"] = schema
    rejected = _rejected(_body(fields))
    assert rejected.reason == "unknown_version"


def test_missing_schema_is_unknown_version() -> None:
    fields = _fields()
    del fields["schema"]
    assert _rejected(_body(fields)).reason == "unknown_version"


def test_unknown_version_is_reported_before_signature_check() -> None:
    fields = _fields(key=KEY)
    fields["schema"] = 2
    assert _rejected(_body(fields), key=KEY).reason == "unknown_version"


@pytest.mark.parametrize("schema", [True, 1.0])
def test_schema_of_wrong_type_is_rejected(schema: Any) -> None:
    fields = _fields()
    fields["schema"] = schema
    with pytest.raises(MessageRejected):
        decode(_body(fields), signing_key=None, max_bytes=MAX)


def test_lone_surrogate_in_step_args_is_rejected_not_raised() -> None:
    fields = _fields()
    fields["step_args"]["data"] = "\ud800"
    body = _body(fields)  # json.dumps escapes it as \ud800: a valid JSON document
    with pytest.raises(MessageRejected):
        decode(body, signing_key=None, max_bytes=MAX)


# -- peek_key --------------------------------------------------------------------------


def test_peek_key_of_valid_body() -> None:
    body = encode(_message(attempt=4), signing_key=KEY, max_bytes=MAX)
    assert peek_key(body) == "run-1234:compute.total:4"


def test_peek_key_of_body_that_does_not_decode() -> None:
    fields = _fields(key=KEY)
    fields["step_key"] = "tampered"
    body = _body(fields)
    assert _rejected(body, key=KEY).reason == "forged"
    assert peek_key(body) == "run-1234:compute.total:0"


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "",
        "[1, 2]",
        '"run:step:0"',
        "{}",
        '{"idempotency_key": 5}',
        '{"idempotency_key": null}',
        '{"idempotency_key": ["a"]}',
        "[" * 100_000,
    ],
)
def test_peek_key_returns_none_without_a_string_key(body: str) -> None:
    assert peek_key(body) is None


# -- properties ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [*REQUIRED_FIELDS, "schema", "signature", "step_args.data", "step_args.encoding", "extra"]
)


def _decodes_or_rejects(body: str, key: str | None) -> StepMessage | None:
    try:
        return decode(body, signing_key=key, max_bytes=MAX)
    except MessageRejected as e:
        assert e.reason in {"malformed", "unknown_version", "forged", "oversized"}
        return None


@settings(max_examples=200, deadline=None, database=None)
@given(body=st.text(max_size=300), key=st.sampled_from([None, KEY]))
def test_decode_of_arbitrary_text_only_rejects(body: str, key: str | None) -> None:
    _decodes_or_rejects(body, key)
    peek_key(body)


@settings(max_examples=100, deadline=None, database=None)
@given(
    fields=st.dictionaries(
        st.sampled_from([*REQUIRED_FIELDS, "schema", "signature"]) | st.text(max_size=8),
        json_values,
        max_size=12,
    ),
    key=st.sampled_from([None, KEY]),
)
def test_decode_of_arbitrary_json_objects_only_rejects(
    fields: dict[str, Any], key: str | None
) -> None:
    assert _decodes_or_rejects(json.dumps(fields), key) is None or fields.get("schema") == 1


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(field=field_names, value=json_values, signed=st.booleans())
def test_decode_of_mutated_valid_message_only_rejects(field: str, value: Any, signed: bool) -> None:
    key = KEY if signed else None
    fields = _fields(key=key)
    original = _message_from(fields)
    if field.startswith("step_args."):
        fields["step_args"][field.split(".", 1)[1]] = value
    else:
        fields[field] = value
    result = _decodes_or_rejects(_body(fields), key)
    if result is not None and signed:
        # Only a no-op mutation can survive the signature.
        assert result == original


# Identifiers go into PostgreSQL text: any character but NUL (Dagster's are far narrower).
identifiers = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=40
)

messages = st.builds(
    StepMessage.new,
    run_id=identifiers,
    step_key=identifiers,
    attempt=st.integers(min_value=0, max_value=2**31),
    step_args=st.text(max_size=2_000) | st.builds(_wordy_text, st.integers(8_000, 20_000)),
    lease_seconds=st.integers(min_value=1, max_value=86_400),
)


@settings(max_examples=150, deadline=None, database=None)
@given(message=messages, key=st.sampled_from([None, KEY]))
def test_encode_decode_round_trip_property(message: StepMessage, key: str | None) -> None:
    body = encode(message, signing_key=key, max_bytes=MAX)
    assert decode(body, signing_key=key, max_bytes=MAX) == message
    assert peek_key(body) == message.idempotency_key


@pytest.mark.parametrize("field", ["run_id", "step_key"])
def test_a_nul_in_a_field_the_ledger_stores_is_malformed(field: str) -> None:
    fields = _fields(key=None)
    fields[field] = "a\x00b"
    assert _rejected(_body(fields), key=None).reason == "malformed"


@pytest.mark.parametrize(("step_key", "match"), [("a\x00b", "NUL"), ("\ud800", "Unicode")])
def test_encode_refuses_what_decode_would_reject(step_key: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode(
            StepMessage.new(
                run_id="r", step_key=step_key, attempt=0, step_args="{}", lease_seconds=1
            ),
            signing_key=None,
            max_bytes=MAX,
        )
