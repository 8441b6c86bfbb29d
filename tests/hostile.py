"""Hostile step messages, built from the message contract's fields, for property tests.

A body is anything that could be put on the queue: fields of the wrong type, text with
lone surrogates and NULs (JSON escapes), huge values, compression bombs, step arguments
for another run or step or from code outside the workers' code locations, with no
signature, a wrong one, or a valid HMAC over an inconsistent body.
"""

from __future__ import annotations

import base64
import functools
import json
import sys
import zlib
from typing import Any

from dagster._core.code_pointer import (
    CodePointer,
    CustomPointer,
    FileCodePointer,
    ModuleCodePointer,
    PackageCodePointer,
)
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import serialize_value
from hypothesis import strategies as st

from dagster_taskiq.core import messages
from dagster_taskiq.core.messages import ENCODING_JSON, ENCODING_ZLIB, SCHEMA_VERSION

SIGNING_KEY = "hostile-test-signing-key"
ALLOWED_MODULE = "tests.jobs"  # the test workers' code location
MARKER_MODULE = "tests.hostile_marker"  # never to be imported by a worker
# Bodies stay within SQS's limit; a worker given this limit finds the huge ones oversized.
MAX_MESSAGE_BYTES = 120_000
HUGE = "h" * 130_000
BOMB_INFLATED_BYTES = 64 * 1024 * 1024
NUL_PATH = "/tmp/no\x00such.py"

FIELDS = (
    "schema",
    "idempotency_key",
    "run_id",
    "step_key",
    "attempt",
    "lease_seconds",
    "enqueued_at",
    "payload_sha256",
    "step_args",
)

# Text as JSON can carry it: any character, lone surrogates and NUL included.
hostile_text = st.text(
    st.one_of(
        st.characters(),
        st.characters(categories=["Cs"]),
        st.sampled_from(["\x00", "\ud800", "\udfff", "\n", "'", '"', "\\"]),
    ),
    max_size=20,
)
wrong_values = st.one_of(
    hostile_text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.just(HUGE),
)


def job_origin(pointer: CodePointer, job_name: str = "outputs_job") -> JobPythonOrigin:
    return JobPythonOrigin(
        job_name, RepositoryPythonOrigin(executable_path=sys.executable, code_pointer=pointer)
    )


def module_origin(module: str, job_name: str = "outputs_job") -> JobPythonOrigin:
    return job_origin(ModuleCodePointer(module, job_name, None), job_name)


def step_args(run_id: str, step_keys: list[str], origin: JobPythonOrigin) -> str:
    return serialize_value(
        ExecuteStepArgs(job_origin=origin, run_id=run_id, step_keys_to_execute=step_keys)
    )


def signed(fields: dict[str, Any], key: str = SIGNING_KEY) -> dict[str, Any]:
    """``fields`` with the HMAC encode() would give them, whatever they say."""
    unsigned = {k: v for k, v in fields.items() if k != "signature"}
    return {**unsigned, "signature": messages._sign(unsigned, key)}


def message_fields(
    run_id: str, step_key: str, attempt: int, args: str, *, compress: bool = False
) -> dict[str, Any]:
    """The fields of a message for these values, consistent with each other, unsigned."""
    data = _deflate(args.encode("utf-8", "surrogatepass")) if compress else args
    return {
        "schema": SCHEMA_VERSION,
        "idempotency_key": messages.idempotency_key(run_id, step_key, attempt),
        "run_id": run_id,
        "step_key": step_key,
        "attempt": attempt,
        "lease_seconds": 30,
        "enqueued_at": "2024-01-01T00:00:00+00:00",
        "payload_sha256": _hash(args),
        "step_args": {"encoding": ENCODING_ZLIB if compress else ENCODING_JSON, "data": data},
    }


def _deflate(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw, 9)).decode()


def _hash(text: str) -> str:
    try:
        return messages.payload_hash(text)
    except UnicodeEncodeError:
        return "0" * 64


@functools.cache
def bomb_data() -> str:
    """Base64 zlib data of about 90 KB that inflates to BOMB_INFLATED_BYTES, made without
    holding them."""
    deflater = zlib.compressobj(9)
    chunk = b"0" * (1024 * 1024)
    parts = [deflater.compress(chunk) for _ in range(BOMB_INFLATED_BYTES // len(chunk))]
    parts.append(deflater.flush())
    return base64.b64encode(b"".join(parts)).decode()


def _pointers(texts: st.SearchStrategy[str]) -> st.SearchStrategy[CodePointer]:
    modules = st.one_of(st.sampled_from([ALLOWED_MODULE, MARKER_MODULE]), texts)
    names = st.one_of(st.sampled_from(["outputs_job", "marker_job"]), texts)
    module_pointers = st.builds(ModuleCodePointer, modules, names, st.none())
    files = st.one_of(
        st.sampled_from(["tests/jobs.py", "tests/hostile_marker.py", NUL_PATH, "\ud800.py"]),
        texts,
    )
    return st.one_of(
        module_pointers,
        st.builds(PackageCodePointer, modules, names, st.none()),
        st.builds(FileCodePointer, files, names, st.none()),
        st.builds(CustomPointer, module_pointers, st.just([]), st.just([])),
    )


def _mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> Any:
    """``common`` three times in four: hostile details are spread over many fields, and a
    body must get past the first of them often enough to reach the next."""
    return st.one_of(common, common, common, rare)


@st.composite
def _step_args_text(draw: st.DrawFn, run_id: str, step_key: str, run_ids: list[str]) -> str:
    if draw(st.sampled_from([False] * 5 + [True])):  # not Dagster's step arguments at all
        return draw(
            st.one_of(
                hostile_text,
                st.sampled_from(
                    ["{}", '{"__class__": "ExecuteStepArgs"}', "[" * 5_000 + "]" * 5_000]
                ),
            )
        )
    args_run_id = draw(_mostly(st.just(run_id), st.one_of(st.sampled_from(run_ids), hostile_text)))
    step_keys = draw(
        _mostly(st.just([step_key]), st.lists(st.sampled_from([step_key, "other"]), max_size=3))
    )
    pointer = draw(_pointers(hostile_text))
    name = draw(_mostly(st.sampled_from(["outputs_job", "marker_job"]), hostile_text))
    return step_args(args_run_id, step_keys, job_origin(pointer, name))


@st.composite
def _step_args_field(draw: st.DrawFn, args: str) -> Any:
    kind = draw(
        st.sampled_from(
            ["json"] * 4
            + ["zlib"] * 2
            + ["bomb", "nested", "bad_base64", "truncated", "unknown", "wrong"]
        )
    )
    raw = args.encode("utf-8", "surrogatepass")
    if kind == "json":
        return {"encoding": ENCODING_JSON, "data": args}
    if kind == "zlib":
        return {"encoding": ENCODING_ZLIB, "data": _deflate(raw)}
    if kind == "bomb":
        return {"encoding": ENCODING_ZLIB, "data": bomb_data()}
    if kind == "nested":  # compressed twice: inflated once, it is not text
        return {"encoding": ENCODING_ZLIB, "data": _deflate(zlib.compress(raw))}
    if kind == "bad_base64":
        return {"encoding": ENCODING_ZLIB, "data": draw(hostile_text) + "!"}
    if kind == "truncated":
        return {"encoding": ENCODING_ZLIB, "data": _deflate(raw)[:-8]}
    if kind == "unknown":
        return {"encoding": draw(wrong_values), "data": args}
    return draw(st.one_of(wrong_values, st.fixed_dictionaries({"encoding": wrong_values})))


@st.composite
def hostile_bodies(draw: st.DrawFn, run_ids: list[str], *, sendable: bool = False) -> str:
    """A message body. ``run_ids``: runs the messages and their step arguments may name.
    ``sendable``: SQS takes the body (no NUL or lone surrogate in it, as JSON escapes
    them anyway)."""
    run_id = draw(_mostly(st.sampled_from(run_ids), hostile_text))
    step_key = draw(_mostly(st.sampled_from(["touch", "emit", "some_step"]), hostile_text))
    attempt = draw(st.integers(0, 3))
    args = draw(_step_args_text(run_id, step_key, run_ids))
    fields = message_fields(run_id, step_key, attempt, args)
    fields["step_args"] = draw(_step_args_field(args))
    changes = draw(st.sampled_from([0, 0, 0, 1, 2]))
    for name in draw(st.lists(st.sampled_from([*FIELDS, "extra"]), max_size=changes, unique=True)):
        if draw(st.booleans()):
            fields.pop(name, None)
        else:
            fields[name] = draw(wrong_values)
    signature = draw(st.sampled_from(["valid", "valid", "none", "wrong", "not_text"]))
    if signature == "valid":
        fields = signed(fields)
    elif signature == "wrong":
        fields = signed(fields, "not-the-key")
    elif signature == "not_text":
        fields["signature"] = draw(wrong_values)
    shape = draw(st.sampled_from(["object"] * 8 + ["not_object", "not_json"]))
    if shape == "not_object":
        body = json.dumps(draw(wrong_values))
    elif shape == "not_json":
        body = draw(hostile_text)
    else:
        body = json.dumps(fields)
    if sendable:
        body = _sendable(body)
        if len(body) > 2 * MAX_MESSAGE_BYTES:  # more than SQS takes: oversized all the same
            body = json.dumps({"schema": SCHEMA_VERSION, "huge": HUGE})
    return body


def _sendable(text: str) -> str:
    # SQS takes #x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD | #x10000-#x10FFFF.
    def ok(ch: str) -> bool:
        code = ord(ch)
        return ch in "\t\n\r" or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or code > 0xFFFF

    return "".join(ch if ok(ch) else "?" for ch in text) or "?"
