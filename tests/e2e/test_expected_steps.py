"""The executor records the steps a run will launch next; the scaler reads them."""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa
from dagster import DagsterInstance, execute_job, reconstructable

from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.scaling.outlook import OutlookStore, expected_steps
from dagster_taskiq.scaling.policy import ScalingConfig
from dagster_taskiq.scaling.scaler import Scaler
from tests import outlook_jobs
from tests.conftest import StackFactory, start_workers
from tests.helpers import wait_for


def _rows(ledger: Ledger, queue_url: str) -> list[Any]:
    """The queue's rows; none until the executor has created the table."""
    try:
        with ledger.transaction() as conn:
            return list(
                conn.execute(
                    sa.select(expected_steps).where(expected_steps.c.queue_url == queue_url)
                ).all()
            )
    except sa.exc.ProgrammingError:
        return []


def test_a_run_records_its_fan_out_while_its_root_runs(
    make_stack: StackFactory, ledger: Ledger
) -> None:
    with make_stack(code_locations=("tests.outlook_jobs",)) as stack:
        start_workers(stack, 1)
        instance = DagsterInstance.from_config(str(stack.dagster_home))
        results: list[bool] = []

        def run() -> None:
            result = execute_job(
                reconstructable(outlook_jobs.fan_out_job),
                instance=instance,
                run_config={"ops": {"slow_root": {"config": {"seconds": 6.0}}}},
            )
            results.append(result.success)

        runner = threading.Thread(target=run)
        runner.start()
        try:
            rows = wait_for(
                lambda: _rows(ledger, stack.queue_url), timeout=60, what="the expected steps"
            )
            assert [row.steps for row in rows] == [outlook_jobs.FAN_OUT]
            # The scaler sees them as backlog before any of them is queued.
            scaler = Scaler(
                queues=[SqsQueue(stack.queue_url, endpoint_url=stack.sqs_endpoint)],
                ledger=ledger,
                service=_Service(),
                config=ScalingConfig(target_backlog_per_worker=1, max_workers=10),
                outlook=OutlookStore(ledger),
            )
            assert scaler.read_signals().expected == outlook_jobs.FAN_OUT
        finally:
            runner.join(120)
            instance.dispose()
        assert results == [True]
        assert _rows(ledger, stack.queue_url) == [], "the run clears its rows when it ends"


class _Service:
    name = "test/service"

    def desired_count(self) -> int:
        return 1

    def set_desired_count(self, count: int) -> None:
        return
