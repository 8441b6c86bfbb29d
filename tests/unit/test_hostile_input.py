"""Hostile input found by an outside probe: whatever a message holds, it is bounded,
storable and answered (rejected or refused), never a crash, never unbounded memory."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from dagster_taskiq.core.errors import MessageRejected, MessageTooLarge
from dagster_taskiq.core.messages import (
    DEFAULT_MAX_STEP_ARGS_BYTES,
    StepMessage,
    decode,
    encode,
    safe_text,
)
from dagster_taskiq.core.sqs import ReceivedMessage
from dagster_taskiq.worker import execution, step_process
from dagster_taskiq.worker.config import STEP_PROCESS_SPAWN, CodeLocation, WorkerSettings
from dagster_taskiq.worker.execution import load_step_args, vet
from dagster_taskiq.worker.origins import origin_allowed
from dagster_taskiq.worker.supervisor import Worker
from dagster_taskiq.worker.tasks import VetRequest, Vetting
from tests.hostile import (
    ALLOWED_MODULE,
    BOMB_INFLATED_BYTES,
    MARKER_MODULE,
    NUL_PATH,
    bomb_data,
    job_origin,
    message_fields,
    module_origin,
    step_args,
)

LOCATIONS = (CodeLocation(ALLOWED_MODULE),)
MIB = 1024 * 1024


# -- safe_text ---------------------------------------------------------------------------


def test_safe_text_replaces_what_cannot_be_stored_and_says_where_it_cut() -> None:
    assert safe_text("a\ud800b\x00c\udfff", 100) == "a\ufffdb\ufffdc\ufffd"
    assert safe_text("plain", 5) == "plain"
    cut = safe_text("x" * 5_000, 2_000)
    assert len(cut) == 2_000
    assert cut.startswith("x" * 1_900) and cut.endswith("[5000 characters, cut]")
    assert safe_text(cut, 2_000) == cut, "idempotent: a second pass changes nothing"
    assert len(safe_text("y" * 50, 3)) == 3
    safe_text("\ud800" * 10 + "\x00", 8).encode()  # always encodable


# -- bounded decompression ----------------------------------------------------------------


def _bomb_body() -> str:
    """A valid message (its hash is of the inflated text) whose step arguments inflate to
    BOMB_INFLATED_BYTES from about 90 KB."""
    digest = hashlib.sha256()
    chunk = b"0" * MIB
    for _ in range(BOMB_INFLATED_BYTES // MIB):
        digest.update(chunk)
    run_id = str(uuid.uuid4())
    fields = message_fields(run_id, "step", 0, "")
    fields["payload_sha256"] = digest.hexdigest()
    fields["step_args"] = {"encoding": "zlib+base64", "data": bomb_data()}
    return json.dumps(fields)


def test_a_compression_bomb_is_oversized_and_never_inflated_in_full() -> None:
    body = _bomb_body()
    assert len(body) < 128 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(MessageRejected) as default_bound:
            decode(body, signing_key=None, max_bytes=256 * 1024)
        _, peak_default = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with pytest.raises(MessageRejected) as small_bound:
            decode(body, signing_key=None, max_bytes=256 * 1024, max_step_args_bytes=MIB)
        _, peak_small = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert default_bound.value.reason == small_bound.value.reason == "oversized"
    assert str(DEFAULT_MAX_STEP_ARGS_BYTES) in default_bound.value.detail
    # Within the bound, and far below the 64 MiB it would inflate to: it is measured a
    # piece at a time, never held.
    assert peak_default < 2 * MIB < DEFAULT_MAX_STEP_ARGS_BYTES
    assert peak_small < 2 * MIB


def test_step_arguments_up_to_the_bound_decode_and_beyond_it_are_refused() -> None:
    args = "a" * (64 * 1024)  # compressed when sent
    message = StepMessage.new("run", "step", 0, args, lease_seconds=30)
    body = encode(message, signing_key=None, max_bytes=256 * 1024)
    assert decode(body, signing_key=None, max_bytes=256 * 1024).step_args == args
    exact = decode(body, signing_key=None, max_bytes=256 * 1024, max_step_args_bytes=len(args))
    assert exact.step_args == args
    with pytest.raises(MessageRejected, match="oversized"):
        decode(body, signing_key=None, max_bytes=256 * 1024, max_step_args_bytes=len(args) - 1)
    small = StepMessage.new("run", "step", 0, "b" * 2_000, lease_seconds=30)  # not compressed
    small_body = encode(small, signing_key=None, max_bytes=256 * 1024)
    with pytest.raises(MessageRejected, match="oversized"):
        decode(small_body, signing_key=None, max_bytes=256 * 1024, max_step_args_bytes=1_999)
    # What workers would refuse is refused at launch, with the sizes.
    with pytest.raises(MessageTooLarge, match="65536 bytes"):
        encode(message, signing_key=None, max_bytes=256 * 1024, max_step_args_bytes=1_000)


def test_truncated_compressed_step_arguments_are_malformed() -> None:
    fields = message_fields("run", "step", 0, "x" * 20_000, compress=True)
    fields["step_args"]["data"] = fields["step_args"]["data"][:-12]
    with pytest.raises(MessageRejected) as rejected:
        decode(json.dumps(fields), signing_key=None, max_bytes=256 * 1024)
    assert rejected.value.reason == "malformed"


def test_a_step_process_holds_the_arguments_of_one_message_at_most() -> None:
    load_step_args.cache_clear()
    for run_id in ("run-a", "run-b", "run-c"):
        args = step_args(run_id, ["emit"], module_origin(ALLOWED_MODULE))
        assert vet(VetRequest(args, run_id, "emit"), LOCATIONS) == Vetting()
        assert load_step_args(args).run_id == run_id
    info = load_step_args.cache_info()
    assert info.maxsize == 1 and info.currsize == 1


# -- vetting: the step arguments are the message's own -------------------------------------


def test_step_arguments_for_another_run_or_step_are_malformed() -> None:
    origin = module_origin(ALLOWED_MODULE)
    args = step_args("run-a", ["emit"], origin)
    assert vet(VetRequest(args, "run-a", "emit"), LOCATIONS) == Vetting()

    other_run = vet(VetRequest(args, "run-b", "emit"), LOCATIONS)
    assert other_run.malformed is not None and "'run-a'" in other_run.malformed
    other_step = vet(VetRequest(args, "run-a", "double"), LOCATIONS)
    assert other_step.malformed is not None and "'double'" in other_step.malformed
    two_steps = vet(
        VetRequest(step_args("run-a", ["emit", "double"], origin), "run-a", "emit"), LOCATIONS
    )
    assert two_steps.malformed is not None


def test_code_outside_the_locations_is_refused() -> None:
    args = step_args("run-a", ["touch"], module_origin(MARKER_MODULE, "marker_job"))
    vetting = vet(VetRequest(args, "run-a", "touch"), LOCATIONS)
    assert vetting.malformed is None
    assert vetting.refusal is not None and f"'{MARKER_MODULE}'" in vetting.refusal


def test_a_nul_in_a_code_path_is_refused_not_raised() -> None:
    from dagster._core.code_pointer import FileCodePointer

    origin = job_origin(FileCodePointer(NUL_PATH, "marker_job", None), "marker_job")
    refusal = origin_allowed(origin, (CodeLocation("tests/jobs.py"),))
    assert refusal is not None and "cannot be read" in refusal
    vetting = vet(VetRequest(step_args("run-a", ["touch"], origin), "run-a", "touch"), LOCATIONS)
    assert vetting.malformed is None and vetting.refusal is not None


def test_whatever_fails_while_vetting_is_an_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    args = step_args("run-a", ["emit"], module_origin(ALLOWED_MODULE))
    request = VetRequest(args, "run-a", "emit")

    def broken(*_: object) -> None:
        raise RuntimeError("no \ud800 way")

    monkeypatch.setattr(execution, "origin_allowed", broken)
    vetting = vet(request, LOCATIONS)
    assert vetting.malformed is not None and "RuntimeError" in vetting.malformed

    # And the step process answers even if vet itself raised: it never dies of a message.
    monkeypatch.setattr(execution, "vet", broken)
    answer = step_process.answer_vet(request, LOCATIONS)
    assert answer.malformed is not None and "RuntimeError" in answer.malformed


# -- a rejection that cannot be recorded is still logged, and left to SQS ------------------


@dataclass
class FakeLog:
    lines: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def error(self, msg: str, *, extra: dict[str, Any]) -> None:
        self.lines.append(("error", msg, extra))

    def warning(self, msg: str, *, extra: dict[str, Any]) -> None:
        self.lines.append(("warning", msg, extra))


@dataclass
class FakeQueue:
    hidden: list[tuple[str, int]] = field(default_factory=list)

    def change_visibility(self, receipt_handle: str, seconds: int) -> None:
        self.hidden.append((receipt_handle, seconds))


class FailingLedger:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def record_rejection(self, **_: object) -> None:
        raise self.error


def _settings(**changes: Any) -> WorkerSettings:
    return WorkerSettings(
        queue_urls=("q",),
        database_url="",
        code_locations=LOCATIONS,
        step_process_start=STEP_PROCESS_SPAWN,
        worker_id="worker-1",
        **changes,
    )


@pytest.mark.parametrize(
    "error",
    [
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        RuntimeError("the statement failed"),
    ],
    ids=["client-side", "other"],
)
def test_a_rejection_that_cannot_be_recorded_is_logged_and_left_to_sqs(error: Exception) -> None:
    log, queue = FakeLog(), FakeQueue()
    worker = Worker(
        _settings(),
        queues={"q": queue},  # type: ignore[dict-item]
        ledger=FailingLedger(error),  # type: ignore[arg-type]
        log=log,  # type: ignore[arg-type]
    )
    received = ReceivedMessage(
        message_id="m-1",
        receipt_handle="r-1",
        body='{"schema":1,"idempotency_key":"\\ud800"}',
        receive_count=1,
        sent_timestamp_ms=0,
        queue_url="q",
    )

    worker._reject(received, "forged", "detail with \ud800 and \x00" + "d" * 5_000)

    assert queue.hidden == [("r-1", 0)], "left to SQS, visible again at once"
    (level, text, extra) = log.lines[-1]
    assert level == "error" and "Could not record the rejection" in text
    assert extra["reason"] == "forged" and extra["message_id"] == "m-1"
    assert type(error).__name__ in extra["error"]
    for line in log.lines:  # every logged value can be written out
        json.dumps(line[2], ensure_ascii=False).encode()
        assert all(len(str(v)) <= 1_000 for v in line[2].values())


# -- the bound is the worker's setting -------------------------------------------------------


class RecordingLedger:
    def __init__(self) -> None:
        self.rejections: list[dict[str, object]] = []

    def record_rejection(self, **record: object) -> None:
        self.rejections.append(record)


def test_the_worker_rejects_step_arguments_beyond_its_bound() -> None:
    ledger, queue = RecordingLedger(), FakeQueue()
    worker = Worker(
        _settings(max_step_args_bytes=10_000, max_message_bytes=256 * 1024),
        queues={"q": queue},  # type: ignore[dict-item]
        ledger=ledger,  # type: ignore[arg-type]
        log=FakeLog(),  # type: ignore[arg-type]
    )
    message = StepMessage.new("run", "step", 0, "a" * 20_000, lease_seconds=30)  # compressed
    body = encode(message, signing_key=None, max_bytes=256 * 1024)
    received = ReceivedMessage("m-1", "r-1", body, 1, 0, "q")

    worker.handle(None, received)  # type: ignore[arg-type]

    (record,) = ledger.rejections
    assert record["reason"] == "oversized" and "10000" in str(record["detail"])
    assert queue.hidden == [("r-1", 0)]


def test_the_worker_command_takes_the_bound_from_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from dagster_taskiq import cli
    from dagster_taskiq.worker import run

    started: list[Any] = []

    def run_worker(settings: Any) -> int:
        started.append(settings)
        return 0

    monkeypatch.setattr(run, "run_worker", run_worker)
    args = ["worker", "--queue-url", "http://q", "--code-location", ALLOWED_MODULE]
    result = CliRunner().invoke(cli.cli, args, env={"DAGSTER_TASKIQ_MAX_STEP_ARGS_BYTES": "4096"})
    assert result.exit_code == 0, result.output
    assert started[0].max_step_args_bytes == 4096
    result = CliRunner().invoke(cli.cli, [*args, "--max-step-args-bytes", "2048"])
    assert started[1].max_step_args_bytes == 2048
    CliRunner().invoke(cli.cli, args, env={"DAGSTER_TASKIQ_MAX_STEP_ARGS_BYTES": ""})
    assert started[2].max_step_args_bytes == DEFAULT_MAX_STEP_ARGS_BYTES
