"""Small helpers for tests that drive real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dagster import DagsterEvent, DagsterEventType, DagsterInstance
from dagster._core.events import EngineEventData
from dagster._core.events.log import EventLogEntry

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    predicate: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    interval: float = 0.2,
    what: str = "",
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def step_events(
    instance: DagsterInstance, run_id: str, event_type: DagsterEventType
) -> list[DagsterEvent]:
    records = instance.get_records_for_run(run_id, of_type=event_type, limit=10_000).records
    return [r.event_log_entry.dagster_event for r in records if r.event_log_entry.dagster_event]


def engine_messages(instance: DagsterInstance, run_id: str) -> list[str]:
    return [e.message or "" for e in step_events(instance, run_id, DagsterEventType.ENGINE_EVENT)]


class RunProcess:
    """A run worker in its own process, so a test can interrupt it like a terminated run."""

    def __init__(self, job_name: str, run_config: dict[str, Any] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.run_job", job_name, json.dumps(run_config or {})],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=os.environ.copy(),
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("RUN_ID "):
            _, err = self.process.communicate(timeout=30)
            raise AssertionError(f"run process failed to start: {line!r}\n{err}")
        self.run_id = line.split(" ", 1)[1]

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def wait(self, timeout: float = 120.0) -> tuple[int, str]:
        _, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, err


@dataclass
class LambdaContext:
    """The attributes of a Lambda context that powertools and the handlers read."""

    function_name: str
    memory_limit_in_mb: int = 256
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    deadline_seconds: float = 60.0

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:123456789012:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return int(self.deadline_seconds * 1000)


def finished_records(ledger: Any, run_id: str, timeout: float = 30.0) -> list[Any]:
    """The run's ledger records once every one is terminal.

    A worker writes a step's events first and records its completion after, so a run can
    end (its run worker reads the events) a moment before the ledger says so.
    """
    return wait_for(
        lambda: (
            records
            if (records := ledger.for_run(run_id)) and all(r.status.is_terminal for r in records)
            else None
        ),
        timeout=timeout,
        what=f"the ledger records of run {run_id} to finish",
    )


# CLI output to a pipe, as a script reads it: without a COLUMNS that something earlier in
# the test process exported (a rich table is then cut to its width).
AS_A_PIPE: dict[str, str | None] = {"COLUMNS": None}


def stored_entry(
    run_id: str,
    kind: DagsterEventType = DagsterEventType.ENGINE_EVENT,
    *,
    step_key: str | None = None,
    data: Any = None,
) -> EventLogEntry:
    """An event log entry of ``kind`` as a run would store it (``data``: its specific data,
    an engine event's by default)."""
    event = DagsterEvent(
        event_type_value=kind.value,
        job_name="job",
        step_key=step_key,
        message="m",
        event_specific_data=data if data is not None else EngineEventData(),
    )
    return EventLogEntry(  # type: ignore[no-untyped-call]  # Dagster leaves it untyped
        error_info=None,
        level=10,
        user_message="m",
        run_id=run_id,
        timestamp=time.time(),
        job_name="job",
        step_key=step_key,
        dagster_event=event,
    )
