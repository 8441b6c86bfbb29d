"""Jobs the end-to-end tests run on real workers.

Every op body records each execution (``dagster_taskiq.load.executions``, the table the
load simulator's jobs use), with the fencing token and the worker, so tests can count
executions: the ground truth for "ran once".
"""

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from dagster import (
    Config,
    Definitions,
    DynamicOut,
    DynamicOutput,
    OpExecutionContext,
    RetryPolicy,
    job,
    op,
)

from dagster_taskiq import taskiq_executor
from dagster_taskiq.core.routing import PRIORITY_TAG, QUEUE_TAG, RUN_PRIORITY_TAG
from dagster_taskiq.load import executions


def record(context: OpExecutionContext, phase: str) -> None:
    executions.record(context.run_id, context.op_handle.name, context.retry_number, phase)


def execution_rows(run_id: str) -> list[dict[str, Any]]:
    return executions.execution_rows(run_id)


# -- passing outputs between steps on different workers ----------------------------------


@op
def emit(context: OpExecutionContext) -> int:
    record(context, "start")
    return 21


@op
def double(context: OpExecutionContext, value: int) -> int:
    record(context, "start")
    return value * 2


@op
def combine(context: OpExecutionContext, doubled: int, original: int) -> int:
    record(context, "start")
    context.log.info(f"combined {doubled} and {original}")
    if doubled + original != 63:
        raise ValueError(f"outputs were not passed: {doubled} + {original}")
    return doubled + original


@job(executor_def=taskiq_executor)
def outputs_job() -> None:
    value = emit()
    combine(double(value), value)


# -- retries ------------------------------------------------------------------------------


@op(retry_policy=RetryPolicy(max_retries=2))
def fails_once(context: OpExecutionContext) -> str:
    record(context, "start")
    if context.retry_number == 0:
        raise RuntimeError("first attempt fails on purpose")
    return "second attempt"


@job(executor_def=taskiq_executor)
def retry_job() -> None:
    fails_once()


# -- a failing op -------------------------------------------------------------------------


@op
def raises(context: OpExecutionContext) -> None:
    record(context, "start")
    raise ValueError("the op failed with code 42")


@job(executor_def=taskiq_executor)
def failing_job() -> None:
    raises()


# -- slow steps: crashes, shutdowns, duplicates, cancellation -----------------------------


class SleepConfig(Config):
    seconds: float = 6.0


def _sleep(context: OpExecutionContext, seconds: float) -> float:
    record(context, "start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
    record(context, "end")
    return seconds


@op
def slow(context: OpExecutionContext, config: SleepConfig) -> float:
    return _sleep(context, config.seconds)


@job(executor_def=taskiq_executor)
def slow_job() -> None:
    slow()


def _slow_op(name: str) -> Any:
    @op(name=name)
    def _op(context: OpExecutionContext, config: SleepConfig) -> float:
        return _sleep(context, config.seconds)

    return _op


SLOW_FANOUT = [_slow_op(f"slow_{i}") for i in range(4)]


@job(executor_def=taskiq_executor)
def slow_fanout_job() -> None:
    for slow_op in SLOW_FANOUT:
        slow_op()


# -- the executor set on Definitions rather than on the job -------------------------------


@op
def plain(context: OpExecutionContext) -> str:
    record(context, "start")
    return "ran on a worker"


@job
def plain_job() -> None:
    plain()


defs = Definitions(jobs=[plain_job], executor=taskiq_executor)


# -- a step that kills its worker every time ----------------------------------------------


@op
def kills_its_worker(context: OpExecutionContext) -> None:
    record(context, "start")
    os._exit(17)


@job(executor_def=taskiq_executor)
def killer_job() -> None:
    kills_its_worker()


# -- routing and priorities ---------------------------------------------------------------


@op(tags={QUEUE_TAG: "highmem"})
def on_highmem(context: OpExecutionContext) -> str:
    record(context, "start")
    return "highmem"


@op
def on_default(context: OpExecutionContext) -> str:
    record(context, "start")
    return "default"


@job(executor_def=taskiq_executor)
def routed_job() -> None:
    on_default()
    on_highmem()


@op(tags={QUEUE_TAG: "nowhere"})
def misrouted(context: OpExecutionContext) -> None:
    record(context, "start")


@job(executor_def=taskiq_executor)
def misrouted_job() -> None:
    misrouted()
    on_default()


def _recording_ops(prefix: str, count: int) -> list[Any]:
    def make(name: str) -> Any:
        @op(name=name)
        def _op(context: OpExecutionContext) -> None:
            record(context, "start")

        return _op

    return [make(f"{prefix}_{i}") for i in range(count)]


BACKGROUND_OPS = _recording_ops("background", 6)
URGENT_OPS = _recording_ops("urgent", 6)


@job(executor_def=taskiq_executor)
def background_job() -> None:
    for background_op in BACKGROUND_OPS:
        background_op()


@job(executor_def=taskiq_executor, tags={RUN_PRIORITY_TAG: "5"})
def urgent_job() -> None:
    for urgent_op in URGENT_OPS:
        urgent_op()


@op(tags={PRIORITY_TAG: "soon"})
def badly_prioritized(context: OpExecutionContext) -> None:
    record(context, "start")


@job(executor_def=taskiq_executor)
def bad_priority_job() -> None:
    badly_prioritized()


# -- many trivial steps (FIFO ordering and deduplication) ---------------------------------

FANOUT_OPS = _recording_ops("leaf", 5)


@job(executor_def=taskiq_executor)
def fanout_job() -> None:
    for leaf in FANOUT_OPS:
        leaf()


# -- a step that prints (compute-log capture) ----------------------------------------------


@op
def prints(context: OpExecutionContext) -> None:
    record(context, "start")
    print(f"printed by {context.run_id}", flush=True)
    print(f"warned by {context.run_id}", file=sys.stderr, flush=True)
    # Straight to the file descriptor, as a subprocess of the op would write.
    os.write(1, f"written by {context.run_id}\n".encode())


@job(executor_def=taskiq_executor)
def printing_job() -> None:
    prints()


# -- a wide dynamic fan-out (the big run) ---------------------------------------------------


class WidthConfig(Config):
    width: int = 10


@op(out=DynamicOut(int))
def spread(config: WidthConfig) -> Iterator[DynamicOutput[int]]:
    for i in range(config.width):
        yield DynamicOutput(i, mapping_key=str(i))


@op
def bump(value: int) -> int:
    return value + 1


@op
def gather(config: WidthConfig, values: list[int]) -> int:
    total = sum(values)
    if len(values) != config.width or total != config.width * (config.width + 1) // 2:
        raise ValueError(f"{len(values)} values of {config.width} arrived, summing to {total}")
    return total


@job(executor_def=taskiq_executor)
def dynamic_fanout_job() -> None:
    gather(spread().map(bump).collect())
