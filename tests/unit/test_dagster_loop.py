"""What the executor relies on in Dagster's step-delegating loop and in dagster-postgres.

``TaskiqExecutor._sleep_seconds`` sends a pass's batched launches and waits for the run's
next event; it is only right while Dagster's loop reads ``_sleep_seconds`` once a pass,
after the launches and before the next read of the event log. These tests fail when a
Dagster upgrade changes that shape, or the names the event wait and the batched event
writes use in dagster-postgres.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from dagster._core.executor.step_delegating.step_delegating_executor import (
    StepDelegatingExecutor,
)
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster_postgres.event_log import event_log as pg_event_log

from dagster_taskiq.executor import event_wait
from dagster_taskiq.executor.definition import TaskiqExecutor


def _tree(function: object) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]


def _reads_of(tree: ast.AST, attribute: str) -> list[ast.Attribute]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == attribute
        and isinstance(node.ctx, ast.Load)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    ]


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
    ]


def _main_loop() -> ast.While:
    (loop,) = [
        node
        for node in ast.walk(_tree(StepDelegatingExecutor.execute))
        if isinstance(node, ast.While)
        and ast.unparse(node.test) == "not active_execution.is_complete"
    ]
    return loop


def test_the_loop_sleeps_last_after_launching_and_reads_events_first() -> None:
    loop = _main_loop()
    last = loop.body[-1]
    assert ast.unparse(last) == "time.sleep(self._sleep_seconds)", "the pass no longer ends in it"
    sleep_line = last.lineno
    (launch,) = _calls(loop, "launch_step")
    assert launch.lineno < sleep_line
    (pop,) = _calls(loop, "_pop_events")
    assert pop.lineno < launch.lineno, "events are read before the pass's launches"
    health = _calls(loop, "check_step_health")
    assert health and all(call.lineno < launch.lineno for call in health)


def test_sleep_seconds_is_read_only_by_the_loop_s_sleep() -> None:
    tree = _tree(StepDelegatingExecutor)
    reads = _reads_of(tree, "_sleep_seconds")
    assert len(reads) == 1, "Dagster reads _sleep_seconds elsewhere: the hook would run there"
    # ... and the executor puts its hook there, as a property.
    assert isinstance(inspect.getattr_static(TaskiqExecutor, "_sleep_seconds"), property)


def test_the_event_log_read_is_the_overridden_method_and_reads_from_its_cursor() -> None:
    # The executor skips a read (returns no events) when none is due, and moves the
    # read's cursor back before an event that committed late.
    signature = inspect.signature(StepDelegatingExecutor._pop_events)
    assert list(signature.parameters) == ["self", "instance", "run_id", "seen_storage_ids"]
    source = inspect.getsource(StepDelegatingExecutor._pop_events)
    assert "self._event_cursor," in source, "the read no longer starts at _event_cursor"
    assert "self._event_cursor = conn.cursor" in source
    assert "record.storage_id not in seen_storage_ids" in source, "a read again repeats events"


def test_the_step_handler_context_asks_the_active_execution_for_its_known_state_only() -> None:
    # The executor hands it a stand-in that answers only get_known_state (built once a pass).
    tree = _tree(StepDelegatingExecutor._get_step_handler_context)
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "active_execution"
    }
    assert used == {"get_known_state"}
    # ... and the known state changes only where the loop handles events and skips steps,
    # which come after the read of events and before the health checks and launches.
    loop = _main_loop()
    (pop,) = _calls(loop, "_pop_events")
    changes = [*_calls(loop, "handle_event"), *_calls(loop, "plan_events_iterator")]
    first_use = min(
        c.lineno for c in [*_calls(loop, "check_step_health"), *_calls(loop, "launch_step")]
    )
    assert all(pop.lineno < c.lineno < first_use for c in changes)


def test_dagster_postgres_names_the_event_wait_and_batched_writes_use() -> None:
    assert pg_event_log.CHANNEL_NAME == event_wait.CHANNEL
    source = inspect.getsource(pg_event_log.PostgresEventLogStorage.store_event)
    assert "NOTIFY {CHANNEL_NAME}" in source
    assert '+ "_" +' in source, "the payload is no longer <run id>_<storage id>"
    assert callable(SqlEventLogStorage._event_to_row)
    assert callable(pg_event_log.PostgresEventLogStorage.index_connection)
