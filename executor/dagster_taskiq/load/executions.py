"""The ground truth for "ran once": every op body of the simulator's jobs records each
execution here, with the fencing token of the attempt it ran under.

The table is written from the step processes and read by ``verify``. Its connection is
its own (``DAGSTER_TASKIQ_LOAD_RECORD_URL``, else the ledger's URL): the instrument must
not go down with the network the load run cuts between workers and the database.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from dagster_taskiq.core.retry import retry_while_unreachable
from dagster_taskiq.core.settings import ENV_DATABASE_URL, ledger_url
from dagster_taskiq.worker.attempt_context import current_attempt

ENV_RECORD_URL = "DAGSTER_TASKIQ_LOAD_RECORD_URL"

metadata = sa.MetaData()
executions = sa.Table(
    "dagster_taskiq_load_executions",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    # One per call of record(): a write retried after a lost answer is not counted twice.
    sa.Column("record_id", sa.Text, unique=True),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("step_key", sa.Text, nullable=False),
    sa.Column("retry_number", sa.Integer, nullable=False),
    sa.Column("phase", sa.Text, nullable=False),  # "start" or "end" of the op body
    sa.Column("fencing_token", sa.BigInteger),  # None outside a taskiq worker
    sa.Column("worker_id", sa.Text),
    sa.Column("worker_pid", sa.Integer, nullable=False),  # the worker supervisor
    sa.Column("process_pid", sa.Integer, nullable=False),  # the step process
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Index("ix_dagster_taskiq_load_executions_run_id", "run_id"),
)
START, END = "start", "end"


def record_url() -> str:
    url = os.environ.get(ENV_RECORD_URL) or os.environ.get(ENV_DATABASE_URL)
    if not url:
        raise RuntimeError(
            f"Set {ENV_RECORD_URL} or {ENV_DATABASE_URL}: the load jobs record each "
            "execution of their op bodies in PostgreSQL."
        )
    return url


def ensure_tables(engine: sa.Engine, tables: sa.MetaData = metadata) -> None:
    """Create the simulator's ``tables`` if missing."""
    with engine.begin() as conn:
        # Many step processes start at once; one of them creates the tables.
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(0x6C6F6164)))
        tables.create_all(conn)


@cache
def _engine() -> sa.Engine:
    engine = sa.create_engine(ledger_url(record_url()), pool_size=1, pool_pre_ping=True)
    ensure_tables(engine)
    return engine


# The instrument outlives the faults it watches: a database restart must not fail the op.
RECORD_PATIENCE_SECONDS = 60.0


def record(run_id: str, step_key: str, retry_number: int, phase: str) -> None:
    """Record one start or end of an op body, under the attempt the worker runs."""
    attempt = current_attempt()
    values = {
        "record_id": uuid.uuid4().hex,
        "run_id": run_id,
        "step_key": step_key,
        "retry_number": retry_number,
        "phase": phase,
        "fencing_token": attempt.fencing_token if attempt else None,
        "worker_id": attempt.worker_id if attempt else None,
        "worker_pid": os.getppid(),
        "process_pid": os.getpid(),
    }
    statement = pg_insert(executions).values(values).on_conflict_do_nothing()

    def write() -> None:
        with _engine().begin() as conn:
            conn.execute(statement)

    retry_while_unreachable(
        write,
        time.monotonic() + RECORD_PATIENCE_SECONDS,
        errors=(sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DatabaseError, OSError),
        what="The execution record's database",
    )


def rows_for_runs(engine: sa.Engine, run_ids: Iterable[str]) -> list[dict[str, Any]]:
    ids = list(run_ids)
    if not ids:
        return []
    with engine.connect() as conn:
        result = conn.execute(
            sa.select(executions).where(executions.c.run_id.in_(ids)).order_by(executions.c.id)
        )
        return [dict(r) for r in result.mappings()]


def execution_rows(run_id: str) -> list[dict[str, Any]]:
    return rows_for_runs(_engine(), [run_id])
