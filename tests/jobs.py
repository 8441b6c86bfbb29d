"""Jobs the end-to-end tests run on real workers.

Every op body records each execution in a PostgreSQL table, with the fencing token and
the worker, so tests can count executions: the ground truth for "ran once".
"""

import os
import time
from functools import cache
from typing import Any

import sqlalchemy as sa
from dagster import (
    Config,
    Definitions,
    OpExecutionContext,
    RetryPolicy,
    job,
    op,
)

from dagster_taskiq import current_attempt, taskiq_executor
from dagster_taskiq.settings import ENV_DATABASE_URL, ledger_url

metadata = sa.MetaData()
executions = sa.Table(
    "test_op_executions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("step_key", sa.Text, nullable=False),
    sa.Column("retry_number", sa.Integer, nullable=False),
    sa.Column("phase", sa.Text, nullable=False),  # "start" or "end"
    sa.Column("fencing_token", sa.Integer),
    sa.Column("worker_pid", sa.Integer, nullable=False),  # the worker supervisor
    sa.Column("process_pid", sa.Integer, nullable=False),  # the step process
    sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)


@cache
def _engine() -> sa.Engine:
    engine = sa.create_engine(ledger_url(os.environ[ENV_DATABASE_URL]), pool_size=1)
    with engine.begin() as conn:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(4242)))
        metadata.create_all(conn)
    return engine


def record(context: OpExecutionContext, phase: str) -> None:
    attempt = current_attempt()
    with _engine().begin() as conn:
        conn.execute(
            executions.insert().values(
                run_id=context.run_id,
                step_key=context.op_handle.name,
                retry_number=context.retry_number,
                phase=phase,
                fencing_token=attempt.fencing_token if attempt else None,
                worker_pid=os.getppid(),
                process_pid=os.getpid(),
            )
        )


def execution_rows(run_id: str) -> list[dict[str, Any]]:
    with _engine().begin() as conn:
        rows = conn.execute(
            sa.select(executions).where(executions.c.run_id == run_id).order_by(executions.c.id)
        )
        return [dict(r) for r in rows.mappings()]


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
