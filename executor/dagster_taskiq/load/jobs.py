"""The load simulator's code location: the jobs it submits, run by real workers.

Every op body records its start and end (``executions.record``), so ``verify`` can count
executions per attempt against the ledger and the event log. Each job says how its runs
should end (``EXPECTED_STATUS``): ``failing_job`` fails on purpose, the others succeed.

Workers load this module as ``--code-location dagster_taskiq.load.jobs``.
"""

# No ``from __future__ import annotations``: Dagster reads the op signatures' types.
import time
from collections.abc import Iterator

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

from dagster_taskiq.executor.definition import taskiq_executor
from dagster_taskiq.load.executions import END, START, record

CODE_LOCATION = "dagster_taskiq.load.jobs"


def _record(context: OpExecutionContext, phase: str) -> None:
    # The step key, not the op name: a fan-out's steps share one op (``part[3]``).
    step_key = context.get_step_execution_context().step.key
    record(context.run_id, step_key, context.retry_number, phase)


class WorkConfig(Config):
    seconds: float = 0.0  # how long the op body works


def _work(context: OpExecutionContext, seconds: float) -> None:
    _record(context, START)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    _record(context, END)


# -- fast and slow: one op ----------------------------------------------------------------


@op
def quick(context: OpExecutionContext, config: WorkConfig) -> float:
    _work(context, config.seconds)
    return config.seconds


@job(executor_def=taskiq_executor)
def fast_job() -> None:
    quick()


@op
def sleepy(context: OpExecutionContext, config: WorkConfig) -> float:
    _work(context, config.seconds)
    return config.seconds


@job(executor_def=taskiq_executor)
def slow_job() -> None:
    sleepy()


# -- fan-out and fan-in: a width chosen per run --------------------------------------------


class FanoutConfig(Config):
    width: int = 8


@op(out=DynamicOut(int))
def split(context: OpExecutionContext, config: FanoutConfig) -> Iterator[DynamicOutput[int]]:
    _record(context, START)
    for index in range(config.width):
        yield DynamicOutput(index, mapping_key=str(index))
    _record(context, END)


@op
def part(context: OpExecutionContext, config: WorkConfig, index: int) -> int:
    _work(context, config.seconds)
    return index


@op
def gather(context: OpExecutionContext, parts: list[int]) -> int:
    _record(context, START)
    total = sum(parts)
    _record(context, END)
    return total


@job(executor_def=taskiq_executor)
def fanout_job() -> None:
    gather(split().map(part).collect())


# -- a chain: each step waits for the one before ------------------------------------------


@op
def link_1(context: OpExecutionContext) -> int:
    _work(context, 0.0)
    return 1


@op
def link_2(context: OpExecutionContext, previous: int) -> int:
    _work(context, 0.0)
    return previous + 1


@op
def link_3(context: OpExecutionContext, previous: int) -> int:
    _work(context, 0.0)
    return previous + 1


@job(executor_def=taskiq_executor)
def chain_job() -> None:
    link_3(link_2(link_1()))


# -- a retried op: fails its first attempt ------------------------------------------------


@op(retry_policy=RetryPolicy(max_retries=2))
def flaky(context: OpExecutionContext) -> int:
    _record(context, START)
    if context.retry_number == 0:
        raise RuntimeError("the first attempt fails on purpose")
    _record(context, END)
    return context.retry_number


@job(executor_def=taskiq_executor)
def retry_job() -> None:
    flaky()


# -- an op that fails: the run must fail, and only once ------------------------------------


@op
def broken(context: OpExecutionContext) -> None:
    _record(context, START)
    raise ValueError("this op fails on purpose")


@job(executor_def=taskiq_executor)
def failing_job() -> None:
    broken()


JOBS = {j.name: j for j in (fast_job, slow_job, fanout_job, chain_job, retry_job, failing_job)}
EXPECTED_STATUS = {name: ("FAILURE" if name == "failing_job" else "SUCCESS") for name in JOBS}

defs = Definitions(jobs=list(JOBS.values()))
