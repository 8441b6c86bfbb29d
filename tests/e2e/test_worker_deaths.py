"""Whole workers die mid-step, as a lost Fargate task dies: supervisor and step processes
together, nothing left to give the step back. One death costs one delivery: with
``max_receive_count`` N, a step survives N - 1 deaths and then succeeds; after N deaths it
is dead-lettered after exactly N deliveries.

The lease (9 s) is renewed every half second while the message's visibility is extended
every 3 s (a third of the lease), as a 300 s lease is renewed every 10 s and its
visibility every 100 s: a worker killed between two extensions leaves a ledger lease
renewed after the visibility was. The message must never come back before the lease has
expired: a receive that finds the lease live is a delivery spent for nothing.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance

from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.dead_letters.processor import Outcome
from dagster_taskiq.load.faults import kill_whole_worker
from dagster_taskiq.local.stack import WorkerPool
from tests import jobs
from tests.conftest import StackFactory, start_workers
from tests.helpers import RunProcess, engine_messages, finished_records, step_events, wait_for

MAX_RECEIVE_COUNT = 3
LEASE = 9
HEARTBEAT = ("--max-heartbeat-interval", "0.5")
# How long after each start its worker is killed: the first before the first heartbeat
# (the message is still hidden only by its receive), the others after several.
KILL_AFTER = (0.3, 2.2, 5.2)


def run_config(seconds: float) -> dict[str, Any]:
    return {
        "ops": {"slow": {"config": {"seconds": seconds}}},
        "execution": {"config": {"visibility_timeout": LEASE, "health_check_interval": 1}},
    }


def starts(run_id: str) -> list[dict[str, Any]]:
    return [r for r in jobs.execution_rows(run_id) if r["phase"] == "start"]


def kill_each_start(pool: WorkerPool, run_id: str, deaths: int) -> list[int]:
    """Kill the whole worker running the step, ``deaths`` times; after each death a new
    worker takes the dead one's place, as ECS replaces a lost task."""
    victims: list[int] = []
    for death in range(deaths):

        def started(death: int = death) -> list[dict[str, Any]] | None:
            rows = starts(run_id)
            return rows if len(rows) > death else None

        victim = wait_for(started, timeout=60, what=f"start {death + 1}")[death]["worker_pid"]
        time.sleep(KILL_AFTER[death])
        kill_whole_worker(victim)

        def gone(victim: int = victim) -> bool:
            return all(
                w.process.poll() is not None for w in pool.workers if w.process.pid == victim
            )

        wait_for(gone, timeout=10, what="the killed worker to be gone")
        pool.replace_dead()
        victims.append(victim)
    return victims


@pytest.mark.slow  # a long fault run: `make test-slow`
def test_a_step_survives_one_fewer_whole_worker_deaths_than_its_deliveries(
    make_stack: StackFactory, ledger: Ledger
) -> None:
    with make_stack(max_receive_count=MAX_RECEIVE_COUNT) as stack:
        pool = start_workers(stack, 1, args=HEARTBEAT)
        run = RunProcess("slow_job", run_config(seconds=6.0))
        victims = kill_each_start(pool, run.run_id, MAX_RECEIVE_COUNT - 1)
        code, err = run.wait(180)

        assert code == 0, f"the run must succeed without anyone touching it:\n{err[-3000:]}"
        rows = starts(run.run_id)
        assert [r["fencing_token"] for r in rows] == [1, 2, 3]
        assert rows[-1]["worker_pid"] not in victims
        (record,) = finished_records(ledger, run.run_id)
        assert record.status is Status.SUCCEEDED
        assert record.fencing_token == MAX_RECEIVE_COUNT
        assert record.deliveries == MAX_RECEIVE_COUNT, "one delivery per death, none spent BUSY"
        instance = DagsterInstance.get()
        assert sum("lost its lease" in m for m in engine_messages(instance, run.run_id)) == 2


@pytest.mark.slow  # a long fault run: `make test-slow`
def test_a_step_whose_worker_dies_every_time_is_dead_lettered_after_exactly_n_deliveries(
    make_stack: StackFactory, ledger: Ledger
) -> None:
    with make_stack(max_receive_count=MAX_RECEIVE_COUNT) as stack:
        consumer = stack.process_dead_letters()
        pool = start_workers(stack, 1, args=HEARTBEAT)
        run = RunProcess("slow_job", run_config(seconds=60.0))
        kill_each_start(pool, run.run_id, MAX_RECEIVE_COUNT)
        code, err = run.wait(180)

        assert code == 1, f"the step is dead-lettered and the run fails:\n{err[-3000:]}"
        assert len(starts(run.run_id)) == MAX_RECEIVE_COUNT
        record = ledger.get(f"{run.run_id}:slow:0")
        assert record is not None and record.status is Status.DEAD_LETTERED
        assert record.deliveries == MAX_RECEIVE_COUNT
        assert record.fencing_token == MAX_RECEIVE_COUNT
        (result,) = wait_for(lambda: consumer.results, timeout=30, what="the dead letter")
        assert result.outcome is Outcome.MARKED
        instance = DagsterInstance.get()
        (failure,) = step_events(instance, run.run_id, DagsterEventType.STEP_FAILURE)
        error = failure.step_failure_data.error
        assert error is not None
        assert f"after {MAX_RECEIVE_COUNT} deliveries" in error.message
