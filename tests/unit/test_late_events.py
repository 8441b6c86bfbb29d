"""An event that commits after a later one was read is still read: its notification
names an id below the read's cursor, and the executor reads again from just before it."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from dagster import DagsterEvent
from dagster._core.event_api import EventLogCursor, EventLogRecord
from dagster._core.events import EngineEventData
from dagster._core.events.log import EventLogEntry
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.step_delegating import CheckStepHealthResult, StepHandler

from dagster_taskiq.executor.definition import TaskiqExecutor


class NoSteps(StepHandler):
    @property
    def name(self) -> str:
        return "none"

    def launch_step(self, step_handler_context: Any) -> Iterator[DagsterEvent]:
        return iter(())

    def check_step_health(self, step_handler_context: Any) -> CheckStepHealthResult:
        return CheckStepHealthResult.healthy()

    def terminate_step(self, step_handler_context: Any) -> Iterator[DagsterEvent]:
        return iter(())


class EventLog:
    """The run's committed events, read as Dagster's SQL storage reads them: after the
    cursor's id, in id order; a log message (no Dagster event) is left out."""

    def __init__(self) -> None:
        self.committed: dict[int, EventLogEntry] = {}
        self.reads = 0

    def commit(self, storage_id: int, *, log_message: bool = False) -> None:
        event = None
        if not log_message:
            event = DagsterEvent(
                event_type_value="ENGINE_EVENT",
                job_name="job",
                message=f"event {storage_id}",
                event_specific_data=EngineEventData(),
            )
        self.committed[storage_id] = EventLogEntry(  # type: ignore[no-untyped-call]
            error_info=None,
            level=10,
            user_message=f"event {storage_id}",
            run_id="run",
            timestamp=0.0,
            dagster_event=event,
        )

    def get_records_for_run(
        self, run_id: str, cursor: str | None, of_type: object, limit: int
    ) -> SimpleNamespace:
        self.reads += 1
        after = EventLogCursor.parse(cursor).storage_id() if cursor else 0
        records = [
            EventLogRecord(storage_id=i, event_log_entry=entry)
            for i, entry in sorted(self.committed.items())
            if i > after and entry.dagster_event is not None
        ][:limit]
        if records:
            cursor = EventLogCursor.from_storage_id(records[-1].storage_id).to_string()
        return SimpleNamespace(records=records, cursor=cursor)

    @property
    def event_log_storage(self) -> Any:
        return SimpleNamespace(default_run_scoped_event_tailer_offset=lambda: 0)


class Waiter:
    def __init__(self) -> None:
        self.notified: list[int] = []

    def read_due(self) -> bool:
        return True

    def take_notified(self) -> list[int]:
        notified, self.notified = self.notified, []
        return notified

    def found_events(self) -> None:
        pass


def _executor() -> tuple[TaskiqExecutor, Waiter]:
    executor = TaskiqExecutor(
        NoSteps(), retries=RetryMode.DISABLED, sleep_seconds=0.1, unreachable_retry_seconds=1
    )
    waiter = Waiter()
    executor._waiter = waiter  # type: ignore[assignment]
    return executor, waiter


def _messages(events: list[DagsterEvent]) -> list[str]:
    return [e.message or "" for e in events]


def test_an_event_committed_after_a_later_one_was_read_is_read() -> None:
    executor, waiter = _executor()
    log, seen = EventLog(), set[int]()
    log.commit(1)
    log.commit(3)  # 2 has its id, and is not committed yet
    waiter.notified = [1, 3]
    assert _messages(executor._pop_events(log, "run", seen)) == ["event 1", "event 3"]  # type: ignore[arg-type]

    log.commit(2)
    waiter.notified = [2]
    assert _messages(executor._pop_events(log, "run", seen)) == ["event 2"]  # type: ignore[arg-type]
    log.commit(4)
    waiter.notified = [4]
    assert _messages(executor._pop_events(log, "run", seen)) == ["event 4"]  # type: ignore[arg-type]


def test_a_log_message_is_read_past_once() -> None:
    executor, waiter = _executor()
    log, seen = EventLog(), set[int]()
    log.commit(1)
    log.commit(2, log_message=True)
    log.commit(3)
    assert len(executor._pop_events(log, "run", seen)) == 2  # type: ignore[arg-type]
    waiter.notified = [1, 2, 3]  # drained after the read: 2 looks late
    assert executor._pop_events(log, "run", seen) == []  # type: ignore[arg-type]
    assert executor._pop_events(log, "run", seen) == []  # type: ignore[arg-type]
    assert executor._event_cursor == EventLogCursor.from_storage_id(3).to_string()
