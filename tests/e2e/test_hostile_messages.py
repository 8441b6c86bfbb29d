"""Hostile messages through real workers, while a real run executes.

Generated bodies (wrong types, lone surrogates and NULs, huge values, compression bombs,
step arguments for other runs and from other code, signed and not) and the cases an
outside probe found go to the queue of a worker that signs and runs ``tests.jobs`` only.
The worker and its step processes stay up, the real run succeeds, nothing from outside
the allow-list is imported, and every message is accounted for: rejected and recorded
(then dead-lettered), or refused and failed in the ledger with the reason.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psutil
from dagster import DagsterInstance, reconstructable
from dagster._core.code_pointer import FileCodePointer
from dagster._core.execution.api import create_execution_plan
from hypothesis import HealthCheck, Phase, given, settings

from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.core.messages import StepMessage, encode, payload_hash, peek_key
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.worker.fork_server import STEP_PROCESS_NAME
from tests import hostile_marker
from tests.conftest import StackFactory, start_workers
from tests.helpers import RunProcess, wait_for
from tests.hostile import (
    ALLOWED_MODULE,
    MARKER_MODULE,
    MAX_MESSAGE_BYTES,
    NUL_PATH,
    SIGNING_KEY,
    bomb_data,
    hostile_bodies,
    job_origin,
    message_fields,
    module_origin,
    signed,
    step_args,
)

GENERATED_MESSAGES = 25


def _step_processes(worker_pid: int) -> set[int]:
    # Forked from the fork server or spawned, a step process is the supervisor's child.
    children = psutil.Process(worker_pid).children()
    return {c.pid for c in children if c.name() == STEP_PROCESS_NAME}


def _body(run_id: str, step_key: str, attempt: int, args: str) -> str:
    message = StepMessage.new(run_id, step_key, attempt, args, lease_seconds=30)
    return encode(message, signing_key=SIGNING_KEY, max_bytes=MAX_MESSAGE_BYTES)


def test_hostile_messages_never_run_never_crash_a_worker_and_are_all_accounted_for(
    make_stack: StackFactory, ledger: Ledger, tmp_path: Path
) -> None:
    marker_file = tmp_path / "marker"
    with make_stack(max_receive_count=2) as stack:
        pool = start_workers(
            stack,
            1,
            args=("--signing-key", SIGNING_KEY, "--max-message-bytes", str(MAX_MESSAGE_BYTES)),
            concurrency=2,
            extra_env={hostile_marker.ENV_MARKER_FILE: str(marker_file)},
        )
        (worker,) = pool.processes
        queue = SqsQueue(stack.queue_url, endpoint_url=stack.sqs_endpoint)
        instance = DagsterInstance.get()
        try:
            # A run of code outside the allow-list, in the workers' own instance.
            recon = reconstructable(hostile_marker.marker_job)
            marker_run = instance.create_run_for_job(
                job_def=recon.get_definition(),
                execution_plan=create_execution_plan(recon),
                job_code_origin=recon.get_python_origin(),
            )
            marker_id = marker_run.run_id
            step_processes = wait_for(
                lambda: (found := _step_processes(worker.pid)) and len(found) == 2 and found,
                timeout=60,
                what="the worker's two step processes",
            )
            legit = RunProcess(
                "outputs_job", {"execution": {"config": {"signing_key": SIGNING_KEY}}}
            )

            # Step arguments naming the allowed module, for the marker's run: launched (it
            # has a ledger row, so it is claimed) and not.
            allowed_for_marker = step_args(marker_id, ["touch"], module_origin(ALLOWED_MODULE))
            launched = _body(marker_id, "touch", 0, allowed_for_marker)
            assert ledger.enqueue(
                f"{marker_id}:touch:0",
                run_id=marker_id,
                step_key="touch",
                attempt=0,
                payload_hash=payload_hash(allowed_for_marker),
                ttl_seconds=3_600,
            )
            bomb = message_fields(str(uuid.uuid4()), "emit", 0, "")
            bomb["step_args"] = {"encoding": "zlib+base64", "data": bomb_data()}
            other_run = str(uuid.uuid4())
            nul_origin = job_origin(FileCodePointer(NUL_PATH, "marker_job", None), "marker_job")
            assert marker_run.job_code_origin is not None
            bodies = [
                launched,
                # The launched step's key with other arguments: rejected as a mismatch,
                # though its key's step is refused.
                _body(
                    marker_id,
                    "touch",
                    0,
                    step_args(marker_id, ["touch"], marker_run.job_code_origin),
                ),
                _body(marker_id, "touch", 1, allowed_for_marker),
                _body(
                    marker_id,
                    "touch",
                    2,
                    step_args(marker_id, ["touch"], marker_run.job_code_origin),
                ),
                _body(
                    other_run,
                    "touch",
                    0,
                    step_args(other_run, ["touch"], module_origin(MARKER_MODULE, "marker_job")),
                ),
                _body(other_run, "touch", 0, allowed_for_marker),  # another run's arguments
                _body(other_run, "touch", 0, step_args(other_run, ["touch"], nul_origin)),
                json.dumps(signed(bomb)),
                '{"schema":1,"idempotency_key":"\\ud800"}',  # unsigned, as the probe sent it
            ]
            sent = {queue.send(body): body for body in bodies}

            @settings(
                max_examples=GENERATED_MESSAGES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(hostile_bodies([marker_id, legit.run_id, other_run], sendable=True))
            def send(body: str) -> None:
                sent[queue.send(body)] = body

            send()

            code, err = legit.wait(timeout=90)
            assert code == 0, f"the legitimate run failed:\n{err[-3000:]}"

            def unaccounted() -> list[str]:
                rejected = {r["message_id"] for r in ledger.rejections()}
                return [
                    mid
                    for mid, body in sent.items()
                    if mid not in rejected and not _refused(ledger, body)
                ]

            wait_for(lambda: not unaccounted(), timeout=60, what="every message accounted for")
            # Refused ones were failed with the reason (and deleted); the rest dead-letter.
            launched_row = ledger.get(f"{marker_id}:touch:0")
            assert launched_row is not None and launched_row.status is Status.FAILED
            assert launched_row.error is not None and MARKER_MODULE in launched_row.error
            # Counted by message, once the queue is empty (every message received for
            # the last time): a generated body may share its key with the refused step
            # and still be rejected (a mismatch), so it dead-letters.
            dlq = SqsQueue(stack.dlq_url, endpoint_url=stack.sqs_endpoint)

            def explain(error: AssertionError, expected: str) -> AssertionError:
                return AssertionError(
                    f"{error}: {expected}; dead-letter queue {dlq.depth()}, queue "
                    f"{queue.depth()}\n{pool.logs()[-4000:]}"
                )

            try:
                wait_for(
                    lambda: (depth := queue.depth()).visible + depth.in_flight == 0,
                    timeout=60,
                    what="the queue to empty",
                )
            except AssertionError as e:
                raise explain(e, f"{len(sent)} sent") from None
            rejected = {r["message_id"] for r in ledger.rejections()}
            to_dlq = sum(1 for mid in sent if mid in rejected)
            try:
                wait_for(
                    lambda: dlq.depth().visible == to_dlq,
                    timeout=10,
                    what="the rejected messages in the DLQ",
                )
            except AssertionError as e:
                raise explain(e, f"{to_dlq} rejected of {len(sent)} sent") from None

            assert not marker_file.exists(), marker_file.read_text()
            assert instance.all_logs(marker_id) == [], "nothing ran for the marker's run"
            assert worker.poll() is None, "the worker exited"
            assert _step_processes(worker.pid) == step_processes, "a step process died"
            logs = pool.logs()
            for line in ("Could not read the step arguments", "Could not record", "Traceback"):
                assert line not in logs
        finally:
            instance.dispose()


def _refused(ledger: Ledger, body: str) -> bool:
    """The message's step was claimed and failed with a refusal (then it was deleted)."""
    key = peek_key(body)
    if key is None or "\x00" in key or key.encode("utf-8", "replace").decode() != key:
        return False  # not a key the ledger could hold
    row = ledger.get(key)
    return (
        row is not None
        and row.status is Status.FAILED
        and row.error is not None
        and row.error.startswith("Refused")
    )
