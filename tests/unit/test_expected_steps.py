"""The steps a run will launch next, read from Dagster's ActiveExecution.

A contract test: ``dagster_taskiq.executor.expected_steps`` reads ActiveExecution's private
state, so this drives a real one through Dagster's own event handling and checks what is
counted at each point. It fails if a Dagster release changes that state.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping

import pytest
from dagster import DagsterEvent, DagsterEventType, DynamicOut, DynamicOutput, job, op
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.objects import StepSuccessData
from dagster._core.execution.plan.outputs import StepOutputData, StepOutputHandle
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.step import IExecutionStep
from dagster._core.execution.retries import RetryMode

from dagster_taskiq.core.routing import QUEUE_TAG, QueueRoute, Routing
from dagster_taskiq.executor.expected_steps import RunOutlook, by_queue, upcoming_steps
from dagster_taskiq.scaling.policy import ExpectedSteps


@op
def root() -> int:
    return 1


@op(tags={QUEUE_TAG: "big"})
def left(x: int) -> int:
    return x


@op
def right(x: int) -> int:
    return x


@op
def join(x: int, y: int) -> int:
    return x + y


@op(out=DynamicOut())
def split(x: int) -> Iterator[DynamicOutput[int]]:
    for i in range(3):
        yield DynamicOutput(i, mapping_key=str(i))


@op
def each(x: int) -> int:
    return x


@op
def then(x: int) -> int:
    return x


@op
def gather(xs: list[int]) -> int:
    return sum(xs)


@job
def plan_job() -> None:
    r = root()
    join(left(r), right(r))
    gather(split(r).map(each).map(then).collect())


def _plan() -> ExecutionPlan:
    return create_execution_plan(plan_job)


@contextlib.contextmanager
def _active(max_concurrent: int | None = None) -> Iterator[ActiveExecution]:
    """A run's ActiveExecution, interrupted at the end: these tests never finish its plan."""
    execution = ActiveExecution(
        _plan(), retry_mode=RetryMode.DISABLED, max_concurrent=max_concurrent
    )
    with contextlib.suppress(DagsterExecutionInterruptedError), execution as active:
        yield active
        active.mark_interrupted()


def _event(
    kind: DagsterEventType, step_key: str, data: StepOutputData | StepSuccessData | None = None
) -> DagsterEvent:
    if kind is DagsterEventType.STEP_SUCCESS:
        data = StepSuccessData(duration_ms=1.0)  # type: ignore[no-untyped-call]
    return DagsterEvent(
        event_type_value=kind.value,
        job_name="plan_job",
        step_key=step_key,
        event_specific_data=data,
    )


def _succeed(active: ActiveExecution, step_key: str, *mapping_keys: str) -> None:
    """The events a worker's step writes: its outputs, then its success."""
    for mapping_key in mapping_keys or (None,):
        handle = StepOutputHandle(step_key, "result", mapping_key)
        active.handle_event(
            _event(
                DagsterEventType.STEP_OUTPUT,
                step_key,
                StepOutputData(step_output_handle=handle),
            )
        )
    active.handle_event(
        _event(
            DagsterEventType.STEP_SUCCESS,
            step_key,
        )
    )


def _counted(active: ActiveExecution) -> dict[str, int]:
    return {item.step.key: item.count for item in upcoming_steps(active)}


def test_what_a_run_launches_next_at_each_point() -> None:
    with _active() as active:
        assert _counted(active) == {}  # nothing in flight: nothing to wait for
        assert [s.key for s in active.get_steps_to_execute()] == ["root"]
        # The root runs: its three children are next; join waits on two of them.
        assert _counted(active) == {"left": 1, "right": 1, "split": 1}

        _succeed(active, "root")
        launched = {s.key for s in active.get_steps_to_execute()}
        assert launched == {"left", "right", "split"}
        # join waits only on steps in flight; the mapped steps wait on mapping keys.
        assert _counted(active) == {"join": 1}

        # split yields two of its mapping keys: each[?] will run twice; then[?] waits on it.
        for mapping_key in ("0", "1"):
            handle = StepOutputHandle("split", "result", mapping_key)
            active.handle_event(
                _event(
                    DagsterEventType.STEP_OUTPUT,
                    "split",
                    StepOutputData(step_output_handle=handle),
                )
            )
        assert _counted(active) == {"join": 1, "each[?]": 2}

        _succeed(active, "left")
        _succeed(active, "right")
        assert {s.key for s in active.get_steps_to_execute()} == {"join"}
        assert _counted(active) == {"each[?]": 2}

        # Once split ends its mapped steps are planned, and launched at once.
        active.handle_event(_event(DagsterEventType.STEP_SUCCESS, "split"))
        launched = {s.key for s in active.get_steps_to_execute()}
        assert launched == {"each[0]", "each[1]"}
        assert _counted(active) == {"then[0]": 1, "then[1]": 1}


def test_steps_held_back_by_max_concurrent_are_counted_and_capped() -> None:
    with _active(max_concurrent=1) as active:
        active.get_steps_to_execute(1)
        _succeed(active, "root")
        (first,) = active.get_steps_to_execute(1)
        found = upcoming_steps(active)
        assert first.key not in {item.step.key for item in found}
        assert sum(item.count for item in found) == 2  # the two held back
        assert by_queue(found, lambda step: "q", max_concurrent=1) == {"q": 1}


ROUTING = Routing(
    routes={
        "default": QueueRoute(name="default", url="https://sqs/default"),
        "big": QueueRoute(name="big", url="https://sqs/big"),
    }
)


def test_steps_are_counted_on_the_queue_they_are_routed_to() -> None:
    with _active() as active:
        active.get_steps_to_execute()
        outlook = RunOutlook(_Store(), ROUTING)
        outlook._run_tags = {}
        counts = by_queue(upcoming_steps(active), outlook._queue_of)
        assert counts == {"https://sqs/big": 1, "https://sqs/default": 2}


class _Store:
    """The outlook table, in memory."""

    def __init__(self, fail: bool = False) -> None:
        self.rows: dict[str, dict[str, ExpectedSteps]] = {}
        self.writes = 0
        self.fail = fail
        self.written = threading.Event()

    def ensure_schema(self) -> None:
        return

    def record(self, run_id: str, counts: Mapping[str, ExpectedSteps]) -> None:
        self.writes += 1
        if self.fail:
            raise RuntimeError("database down")
        self.rows[run_id] = dict(counts)
        self.written.set()

    def clear(self, run_id: str) -> None:
        if self.fail:
            raise RuntimeError("database down")
        self.rows.pop(run_id, None)


def test_the_outlook_writes_changes_off_the_loop_and_clears_at_the_end() -> None:
    store = _Store()
    outlook = RunOutlook(store, ROUTING)
    outlook.start("run-1", {})
    with _active() as active:
        active.get_steps_to_execute()
        outlook.observe(active)
        assert store.written.wait(5)
        found = store.rows["run-1"]
        assert {url: e.steps for url, e in found.items()} == {
            "https://sqs/big": 1,
            "https://sqs/default": 2,
        }
        assert all(0 <= e.waiting_seconds < 5 for e in found.values())
        writes = store.writes
        for _ in range(100):
            outlook.observe(active)  # nothing changed: nothing written
        time.sleep(0.2)
        assert store.writes == writes
    outlook.close()
    assert "run-1" not in store.rows


def test_a_failing_store_never_breaks_the_run() -> None:
    store = _Store(fail=True)
    outlook = RunOutlook(store, ROUTING)
    outlook.start("run-1", {})
    with _active() as active:
        active.get_steps_to_execute()
        outlook.observe(active)
        deadline = time.monotonic() + 5
        while store.writes == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.writes >= 1
    outlook.close()  # logs, does not raise


def test_an_unknown_queue_tag_is_left_out() -> None:
    routing = Routing(routes={"default": QueueRoute(name="default", url="https://sqs/default")})
    outlook = RunOutlook(_Store(), routing)
    with _active() as active:
        active.get_steps_to_execute()
        counts = by_queue(upcoming_steps(active), outlook._queue_of)
        assert counts == {"https://sqs/default": 2}  # left is tagged for a queue not known


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("_in_flight", set),
        ("_pending", dict),
        ("_executable", list),
        ("_success", set),
        ("_skipped", set),
        ("_gathering_dynamic_outputs", dict),
    ],
)
def test_the_state_read_is_still_there(name: str, kind: type) -> None:
    with _active() as active:
        assert isinstance(getattr(active, name), kind)
        assert all(isinstance(step, IExecutionStep) for step in active._plan.step_dict.values())
