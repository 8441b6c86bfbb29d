"""The canary: one step of ``dagster_taskiq.operations.doctor.canary_job`` through the real
queue and a real worker, run in this process by the taskiq executor configured as the user's.

The wait is bounded twice. The executor's own pick-up timeout fails a step no worker
took within the timeout, with its reason, as it would in any run. Past the timeout and a
grace, the run is interrupted as Ctrl-C would (the executor then cancels the step), and
the ledger says where the step was: never taken, running, or done by a worker whose
events never reached this instance.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dagster_taskiq.core.errors import LedgerUnavailable
from dagster_taskiq.core.ledger import Ledger, Status, StepRecord
from dagster_taskiq.operations.doctor import DEFAULT_CANARY_TIMEOUT
from dagster_taskiq.operations.doctor.checks import CheckResult, failed, passed

if TYPE_CHECKING:
    from dagster import DagsterInstance

CANARY_CHECK = "canary"
# After the timeout, what the executor's own health check (every second here) and the end
# of the run are given before the run is interrupted.
INTERRUPT_GRACE_SECONDS = 15.0


@contextlib.contextmanager
def _interrupt_after(seconds: float) -> Iterator[threading.Event]:
    """Interrupt a run executing in this thread once ``seconds`` have passed, as Ctrl-C
    would: Dagster's executor loop sees the captured interrupt, cancels the step and ends
    the run. Only on the main thread, where signals arrive; elsewhere the pick-up timeout
    alone bounds the wait. The event says whether it fired."""
    from dagster._utils.interrupts import capture_interrupts, pop_captured_interrupt

    fired = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield fired
        return
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            fired.set()
            os.kill(os.getpid(), signal.SIGINT)

    # Captured around the whole run, so that a signal sent as the run ends is caught here
    # (and dropped) rather than raised as a KeyboardInterrupt after it.
    with capture_interrupts():
        watcher = threading.Thread(target=watch, name="canary-deadline", daemon=True)
        watcher.start()
        try:
            yield fired
        finally:
            done.set()
            watcher.join()
            pop_captured_interrupt()


def send_canary(
    instance: DagsterInstance,
    executor_config: Mapping[str, Any],
    ledger_url: str,
    *,
    timeout: float = DEFAULT_CANARY_TIMEOUT,
) -> CheckResult:
    """Run the canary job; its pick-up and end-to-end times, or why it did not finish."""
    from dagster import execute_job, reconstructable
    from dagster._core.errors import DagsterExecutionInterruptedError
    from dagster._core.storage.dagster_run import RunsFilter

    from dagster_taskiq.operations.doctor import canary_job as canary

    token = uuid.uuid4().hex
    config = {
        **executor_config,
        # The executor fails the step itself, saying why, when no worker takes it in time.
        "pickup_timeout": max(1, math.ceil(timeout)),
        "health_check_interval": 1,
    }
    started = time.monotonic()
    error: str | None = None
    with _interrupt_after(timeout + INTERRUPT_GRACE_SECONDS) as gave_up:
        try:
            result = execute_job(
                reconstructable(canary.canary_job),
                instance=instance,
                # The run's own log lines would bury the report; its event log keeps them.
                run_config={
                    "execution": {"config": config},
                    "loggers": {"console": {"config": {"log_level": "WARNING"}}},
                },
                tags={canary.CANARY_TAG: token},
                raise_on_error=False,
            )
            success = result.success
        except (KeyboardInterrupt, DagsterExecutionInterruptedError) as e:
            success, error = False, f"interrupted ({type(e).__name__})"
        except Exception as e:
            success, error = False, f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - started
    runs = instance.get_runs(RunsFilter(tags={canary.CANARY_TAG: token}), limit=1)
    run_id = runs[0].run_id if runs else None
    state = _ledger_state(ledger_url, run_id) if run_id else _LedgerState(None)
    record = state.record
    data: dict[str, Any] = {"run_id": run_id, "end_to_end_seconds": round(elapsed, 2)}
    if record is not None:
        data |= _timings(record)
    if success and record is not None:
        return passed(
            CANARY_CHECK,
            f"picked up after {data['pickup_seconds']:.2f} s by {record.worker_id}, ran in "
            f"{data['step_seconds']:.2f} s; end to end {elapsed:.2f} s (run {run_id})",
            **data,
        )
    if gave_up.is_set():
        detail = f"Gave up after {timeout:.0f} s: {state.where()}"
    else:
        reason = _failure(instance, run_id) if run_id else None
        detail = f"The canary run {run_id or '(not created)'} failed: " + (
            reason or error or state.where()
        )
        if reason and record is not None and record.status is Status.SUCCEEDED:
            # The executor's reason ("ended without running") does not say why.
            detail += f" By the ledger, {state.where()}"
    return failed(CANARY_CHECK, detail, state.fix(run_id), **data)


@dataclass(frozen=True)
class _LedgerState:
    """The canary step's ledger row, and the rejection of its message if workers refused
    it: where the step was when the wait ended."""

    record: StepRecord | None
    rejection: Mapping[str, Any] | None = None

    def where(self) -> str:
        record = self.record
        if record is None:
            return "the step was never recorded in the ledger: it was not launched."
        if record.started_at is None:
            said = f"no worker took the step ({record.deliveries} deliveries)"
            if self.rejection:
                said += (
                    f"; workers rejected its message {self.rejection['receive_count']} times "
                    f"as {self.rejection['reason']}: {self.rejection['detail']}"
                )
            return said + "."
        if record.status is Status.RUNNING:
            lease = "live" if record.lease_live else "expired"
            return (
                f"worker {record.worker_id} took the step and is still running it (lease {lease})."
            )
        if record.status is Status.SUCCEEDED:
            return (
                f"worker {record.worker_id} recorded the step SUCCEEDED in the ledger, but its "
                "events never reached this instance's event log: the workers' Dagster storage "
                "is not this instance's database."
            )
        if record.status is Status.FAILED:
            return f"worker {record.worker_id} failed the step: {record.error or 'no error'}"
        return f"the step is {record.status.value} in the ledger: {record.error or 'no error'}"

    def fix(self, run_id: str | None) -> str:
        record = self.record
        logs = f"`dagster-taskiq logs worker --run {run_id}`" if run_id else "the workers' logs"
        if record is None:
            return f"See the canary run {run_id} in Dagster: the executor did not launch it."
        if record.started_at is None:
            reason = str(self.rejection["reason"]) if self.rejection else ""
            if "forged" in reason:
                return (
                    "Give the executor and the workers the same signing key (the stack's "
                    "SigningKeySecretArn)."
                )
            if reason:
                return f"Run the same dagster-taskiq release here and in the workers; see {logs}."
            return (
                "Start workers on the queue, or find why they do not take steps: "
                "`dagster-taskiq status` (desired and running workers, the service's events) "
                "and `dagster-taskiq logs worker --since 15m`; a cold start may need a longer "
                "--canary-timeout."
            )
        if record.status is Status.RUNNING:
            return f"See {logs}."
        if record.status is Status.SUCCEEDED:
            return (
                "Give the workers this instance's Dagster storage (their dagster.yaml; "
                "DAGSTER_PG_* in the stack's worker image), on the ledger's database."
            )
        if record.status is Status.FAILED and record.error:
            return (
                "Correct what the worker said (the step's error above, from the ledger); "
                f"{logs} has the rest."
            )
        return f"See the canary run {run_id} in Dagster, and {logs}."


def _ledger_state(url: str, run_id: str) -> _LedgerState:
    ledger = Ledger(url, pool_size=1)
    try:
        records = ledger.for_run(run_id)
        if not records:
            return _LedgerState(None)
        record = records[-1]
        rejection = None
        if record.started_at is None:
            rejection = ledger.rejections_of([record.idempotency_key]).get(record.idempotency_key)
        return _LedgerState(record, rejection)
    except LedgerUnavailable:
        return _LedgerState(None)
    finally:
        ledger.dispose()


def _timings(record: StepRecord) -> dict[str, Any]:
    timings: dict[str, Any] = {"worker_id": record.worker_id, "ledger_status": record.status.value}
    if record.started_at is not None:
        timings["pickup_seconds"] = round(
            (record.started_at - record.enqueued_at).total_seconds(), 3
        )
        if record.finished_at is not None:
            timings["step_seconds"] = round(
                (record.finished_at - record.started_at).total_seconds(), 3
            )
    return timings


def _failure(instance: DagsterInstance, run_id: str) -> str | None:
    """The run's own account of its failure: the step's error, else the run's."""
    from dagster import DagsterEventType

    for event_type in (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE):
        records = instance.get_records_for_run(run_id, of_type=event_type, limit=1).records
        for entry in records:
            event = entry.event_log_entry.dagster_event
            if event is None:
                continue
            error = getattr(event.event_specific_data, "error", None)
            message = getattr(error, "message", None) or event.message
            if message:
                return str(message).strip()
    return None
