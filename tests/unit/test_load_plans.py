"""The load scenarios' plans and the verification's judgement, without a stack."""

from __future__ import annotations

from typing import Any

import pytest
from dagster import DagsterRunStatus

from dagster_taskiq.load import scenarios
from dagster_taskiq.load.executions import END, START
from dagster_taskiq.load.jobs import EXPECTED_STATUS, JOBS
from dagster_taskiq.load.runner import must_launch_again
from dagster_taskiq.load.scenarios import FaultKind
from dagster_taskiq.load.sessions import RELAUNCHED
from dagster_taskiq.load.verify import (
    _attempt_endings,
    _classify_executions,
    count_relaunches,
    percentiles,
)


def test_steady_load_submits_at_the_rate_for_the_duration() -> None:
    plan = scenarios.steady_load(jobs_per_minute=6, duration=300)
    assert [s.at for s in plan.submissions] == [10.0 * i for i in range(30)]
    assert not plan.needs_local_stack


def test_burst_load_interval_is_in_minutes() -> None:
    plan = scenarios.burst_load(burst_size=10, burst_interval_minutes=5, duration=600)
    assert sorted({s.at for s in plan.submissions}) == [0.0, 300.0]
    assert len(plan.submissions) == 20


def test_plans_are_the_same_for_the_same_seed() -> None:
    one = scenarios.mixed_workload(duration=600, seed=7)
    assert one == scenarios.mixed_workload(duration=600, seed=7)
    assert one != scenarios.mixed_workload(duration=600, seed=8)


def test_mixed_workload_has_every_kind_of_job() -> None:
    plan = scenarios.mixed_workload(duration=600)
    assert {s.job for s in plan.submissions} == set(JOBS)
    assert EXPECTED_STATUS["failing_job"] == "FAILURE"


def test_worker_failure_kills_after_each_burst() -> None:
    plan = scenarios.worker_failure(
        failure_burst_size=20, recovery_interval_minutes=2, duration=600, kills_per_burst=2
    )
    assert len(plan.submissions) == 100
    kills = [f for f in plan.faults if f.kind is FaultKind.KILL_WORKER]
    assert len(kills) == 10 and plan.needs_local_stack


def test_network_partitions_are_bounded_and_bursts_too() -> None:
    plan = scenarios.network_partition(max_burst_size=5, duration=600)
    cuts = [f for f in plan.faults if f.kind is FaultKind.PARTITION]
    assert len(cuts) == 20
    assert all(2.0 <= f.seconds <= 8.0 for f in cuts)
    per_burst: dict[float, int] = {}
    for s in plan.submissions:
        per_burst[s.at] = per_burst.get(s.at, 0) + 1
    assert max(per_burst.values()) <= 5


def test_duplicate_delivery_doubles_every_message() -> None:
    plan = scenarios.duplicate_delivery(duration=60)
    assert plan.duplicate_copies == 2 and plan.needs_local_stack


def test_a_rate_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        scenarios.steady_load(jobs_per_minute=0, duration=60)
    with pytest.raises(ValueError, match="positive"):
        scenarios.mixed_workload(jobs_per_minute=0, duration=60)
    with pytest.raises(ValueError, match="positive"):
        scenarios.duplicate_delivery(jobs_per_minute=0, duration=60)


def row(phase: str, token: int | None, worker: int, process: int) -> dict[str, Any]:
    return {"phase": phase, "fencing_token": token, "worker_pid": worker, "process_pid": process}


def test_an_execution_cut_short_by_a_killed_worker_is_explained() -> None:
    rows = [row(START, 1, 10, 11), row(START, 2, 20, 21), row(END, 2, 20, 21)]
    assert _classify_executions(rows, killed_pids={10}) == (1, 0, 0)


def test_an_execution_fenced_out_by_a_later_claim_is_explained() -> None:
    # Cut off until its lease ran out, or given back: either way a new claim, a new token.
    rows = [row(START, 1, 10, 11), row(START, 2, 20, 21), row(END, 2, 20, 21)]
    assert _classify_executions(rows, killed_pids=set()) == (0, 1, 0)
    finished = [row(START, 1, 10, 11), row(END, 1, 10, 11), row(START, 2, 20, 21)]
    assert _classify_executions(finished, killed_pids=set()) == (0, 1, 0)


def test_the_same_token_twice_is_unexplained() -> None:
    rows = [row(START, 1, 10, 11), row(END, 1, 10, 11), row(START, 1, 10, 12)]
    assert _classify_executions(rows, killed_pids=set()) == (0, 0, 1)


def test_an_execution_outside_a_taskiq_worker_twice_is_unexplained() -> None:
    rows = [row(START, None, 10, 11), row(START, None, 10, 12)]
    assert _classify_executions(rows, killed_pids=set()) == (0, 0, 1)


def test_endings_are_counted_per_attempt() -> None:
    from dagster import DagsterEventType as E

    events = [E.STEP_UP_FOR_RETRY, E.STEP_SUCCESS]
    assert [_attempt_endings(events, a) for a in (0, 1, 2)] == [1, 1, 0]
    assert _attempt_endings([E.STEP_SUCCESS, E.STEP_SUCCESS], 0) == 2


def test_percentiles() -> None:
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None}
    figures = percentiles([float(i) for i in range(1, 101)])
    assert figures["p50"] == pytest.approx(50.5) and figures["max"] == 100.0


def test_only_a_run_that_did_not_start_is_launched_again_and_only_so_often() -> None:
    for status in (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING):
        assert must_launch_again(status, launches=1, limit=3)
        assert must_launch_again(status, launches=2, limit=3)
        assert not must_launch_again(status, launches=3, limit=3)
    # Started: its steps may be running; finished: nothing to do; unknown: not guessed.
    for other in (
        DagsterRunStatus.STARTED,
        DagsterRunStatus.SUCCESS,
        DagsterRunStatus.FAILURE,
        DagsterRunStatus.CANCELED,
        None,
    ):
        assert not must_launch_again(other, launches=1, limit=3)


def test_relaunches_are_counted_from_engine_events_once_each() -> None:
    first = f"{RELAUNCHED} (run worker 1 of at most 3, exit code 1)"
    second = f"{RELAUNCHED} (run worker 2 of at most 3, exit code 1)"
    others = ["Started process for run (pid: 12).", "Launching a new run worker to resume run"]
    assert count_relaunches([*others, first, second]) == 2
    # Written twice: committed, the acknowledgement lost, written again.
    assert count_relaunches([first, first, second]) == 2
    assert count_relaunches(others) == 0
