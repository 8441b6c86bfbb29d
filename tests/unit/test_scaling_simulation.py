"""The scaling simulator: its model, its policies as they run in production, its verdicts."""

from __future__ import annotations

import functools
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from dagster_taskiq.scaling.policy import ScalingConfig
from dagster_taskiq.scaling.simulation import report
from dagster_taskiq.scaling.simulation.commands import scaling
from dagster_taskiq.scaling.simulation.engine import GRACE_SECONDS, RunState, Simulation
from dagster_taskiq.scaling.simulation.oracle import OracleSimulation
from dagster_taskiq.scaling.simulation.policies import (
    EVALUATION_SECONDS,
    INVOKE_SECONDS,
    KedaPolicy,
    TaskiqPolicy,
)
from dagster_taskiq.scaling.simulation.workload import (
    BUILT_IN,
    RunSpec,
    Scenario,
    Stage,
    StepRow,
    from_history,
)


def scenario(*runs: RunSpec, max_workers: int = 4, delay: float = 60.0) -> Scenario:
    return Scenario(
        name="test",
        description="test",
        runs=runs,
        max_workers=max_workers,
        steps_per_worker=1,
        start_delay=(delay, delay),
    )


def fan_out(
    run_id: str, at: float, size: int, *, root: float = 30.0, step: float = 60.0
) -> RunSpec:
    return RunSpec(run_id, at, (Stage((root,)), Stage((step,) * size), Stage((10.0,))))


class FixedPolicy:
    """Sets the counts it is given, each at its time."""

    name = "fixed"

    def __init__(self, protected: bool, *counts: tuple[float, int]) -> None:
        self.protected = protected
        self.counts = counts

    def start(self, sim: Simulation) -> None:
        for at, count in self.counts:
            sim.at(at, functools.partial(sim.set_desired, count))

    def steps_queued(self, sim: Simulation, run: RunState, count: int) -> None:
        return


# -- the model -----------------------------------------------------------------------------


def test_a_protected_busy_worker_survives_scale_in_and_stops_when_idle() -> None:
    work = scenario(RunSpec("r", 0.0, (Stage((100.0, 100.0)),)), delay=10.0)

    sim = Simulation(work, FixedPolicy(True, (0.0, 2), (50.0, 0)), seed=1).run()

    assert sim.killed == 0
    assert [w.stopped_at for w in sim.all_workers] == [110.0, 110.0]
    assert [step.waits for step in sim.steps] == [[10.0], [10.0]]


def test_without_protection_a_busy_step_is_killed_after_the_grace_period() -> None:
    work = scenario(RunSpec("r", 0.0, (Stage((100.0, 100.0)),)), delay=10.0)

    sim = Simulation(work, FixedPolicy(False, (0.0, 2), (50.0, 1), (300.0, 0)), seed=1).run()

    # The newest pod goes; its step dies 30 s later and runs again on the other worker.
    assert sim.killed == 1
    killed = next(step for step in sim.steps if step.attempt == 1)
    assert killed.waits == [10.0, 110.0 - (50.0 + GRACE_SECONDS)]
    assert sorted(w.stopped_at or 0 for w in sim.all_workers) == [50.0 + GRACE_SECONDS, 300.0]


def test_the_oracle_starts_workers_in_time_and_bridges_short_gaps() -> None:
    # Two single-step runs 150 s apart: a gap longer than a start (60 s) is not bridged.
    work = scenario(RunSpec("a", 0.0, (Stage((100.0,)),)), RunSpec("b", 250.0, (Stage((100.0,)),)))
    sim = OracleSimulation(work, seed=1).run()
    assert sim.worker_seconds == pytest.approx(2 * (100.0 + 60.0))
    assert all(wait == 0 for step in sim.steps for wait in step.waits)

    # 30 s apart: cheaper to keep the worker idle than to start another.
    close = scenario(RunSpec("a", 0.0, (Stage((100.0,)),)), RunSpec("b", 130.0, (Stage((100.0,)),)))
    bridged = OracleSimulation(close, seed=1).run()
    assert bridged.worker_seconds == pytest.approx(60.0 + 100.0 + 30.0 + 100.0)


def test_a_run_launches_each_stage_when_the_one_before_ends() -> None:
    work = scenario(fan_out("r", 0.0, 3), max_workers=8, delay=0.0)
    sim = OracleSimulation(work, seed=1).run()
    queued = sorted({round(step.first_queued_at, 3) for step in sim.steps})
    assert queued == [0.0, 30.1, 90.2]


# -- this project's policy, as the scaler runs it --------------------------------------------


def _cold_start_evaluation(previous: bool, at: float) -> float:
    """How long after a cold start's first step the first evaluation came."""
    work = scenario(RunSpec("r", at, (Stage((10.0,)),)))
    config = ScalingConfig(max_workers=4)
    sim = Simulation(work, TaskiqPolicy(config, previous=previous, phase=0.0), seed=1).run()
    (cold,) = sim.cold_starts
    return min(t for t in sim.evaluations if t >= cold.first_queued_at) - cold.first_queued_at


def test_a_triggered_evaluation_is_not_throttled_by_the_scheduled_one() -> None:
    # 5 s into a minute the scheduled invocation (0 s, 20 s, 40 s) holds the concurrency.
    assert _cold_start_evaluation(previous=False, at=5.0) == pytest.approx(INVOKE_SECONDS)
    # Before: throttled, retried 1, 2, 4, 8 s later, then the scheduled evaluation at 20 s.
    assert _cold_start_evaluation(previous=True, at=5.0) == pytest.approx(15.0)
    # Once the scheduled invocation has returned, the trigger ran at once before too.
    assert _cold_start_evaluation(previous=True, at=45.0) == pytest.approx(INVOKE_SECONDS)


def test_the_debounce_counts_from_an_invocation_that_happened() -> None:
    """A run queues steps while workers are wanted (no invocation), the pool then goes to
    zero, and the run queues more steps 10 s later, inside the debounce."""

    def invoked(previous: bool) -> int:
        work = scenario(RunSpec("r", 0.0, (Stage((1.0,)),)))
        policy = TaskiqPolicy(ScalingConfig(max_workers=4), previous_trigger=previous)
        sim = Simulation(work, policy, seed=1)
        run = sim.runs[0]
        sim.set_desired(1)
        sim.advance(100.0)  # the worker has started
        policy.steps_queued(sim, run, 1)
        sim.advance(105.0)
        sim.set_desired(0)
        sim.advance(110.0)
        policy.steps_queued(sim, run, 3)
        sim.advance(115.0)
        return len(sim.evaluations)

    # Before, the check at 100 s started the debounce: nothing until the schedule's turn.
    assert invoked(previous=True) == 0
    assert invoked(previous=False) == 1


def test_expected_steps_start_workers_while_the_root_runs() -> None:
    work = scenario(fan_out("r", 0.0, 8, root=120.0, step=60.0), max_workers=8, delay=60.0)
    config = ScalingConfig(max_workers=8, target_backlog_per_worker=1)

    def waits(predictive: bool) -> list[float]:
        sim = Simulation(work, TaskiqPolicy(config, predictive=predictive), seed=1).run()
        return sorted(s.waits[0] for s in sim.steps if s.stage == 1)

    # Without: but for the one the root's worker takes, the fan-out waits for workers to
    # start. With: they started while the root ran.
    assert waits(predictive=False)[1] >= 20
    assert waits(predictive=True)[-1] == 0


def test_the_previous_policy_keeps_busy_workers_for_the_window() -> None:
    work = scenario(fan_out("r", 0.0, 20, step=60.0), max_workers=10, delay=30.0)
    config = ScalingConfig(max_workers=10, scale_in_stabilization_seconds=300)
    cost = {
        previous: report.figures(
            Simulation(work, TaskiqPolicy(config, floor_in_history=previous), seed=1).run()
        ).worker_minutes
        for previous in (True, False)
    }
    assert cost[True] > cost[False]


def test_evaluations_are_serialized() -> None:
    policy = TaskiqPolicy(ScalingConfig(max_workers=4), phase=0.0)
    work = scenario(*(RunSpec(f"r{i}", 5.0, (Stage((10.0,)),)) for i in range(3)))
    sim = Simulation(work, policy, seed=1).run()
    gaps = [b - a for a, b in zip(sim.evaluations, sim.evaluations[1:], strict=False)]
    assert min(gaps) >= EVALUATION_SECONDS - 1e-9


def test_keda_kills_busy_steps_on_a_big_day() -> None:
    work = BUILT_IN["big_day"](1, days=1)
    sim = Simulation(work, KedaPolicy(max_workers=work.max_workers), seed=1).run()
    assert sim.killed > 0


# -- the ledger's history ---------------------------------------------------------------------


def test_history_rows_become_runs_of_stages() -> None:
    origin = datetime(2024, 5, 1, 12, tzinfo=UTC)

    def row(run: str, queued: float, started: float, seconds: float) -> StepRow:
        at = origin + timedelta(seconds=queued)
        start = origin + timedelta(seconds=started)
        return StepRow(run, at, start, start + timedelta(seconds=seconds))

    rows = [
        row("a", 0.0, 2.0, 30.0),
        row("a", 33.0, 40.0, 10.0),
        row("a", 33.2, 41.0, 12.0),
        row("a", 60.0, 61.0, 5.0),
        row("b", 100.0, 101.0, 7.0),
    ]
    built = from_history(
        rows,
        name="history",
        max_workers=3,
        steps_per_worker=2,
        start_delay=(30.0, 60.0),
        dynamic_share=0.0,
        seed=1,
    )
    first, second = built.runs
    assert (first.run_id, first.arrives_at) == ("a", 0.0)
    assert [stage.durations for stage in first.stages] == [(30.0,), (10.0, 12.0), (5.0,)]
    assert all(stage.known_ahead for stage in first.stages)
    assert (second.run_id, second.arrives_at, second.steps) == ("b", 100.0, 1)
    with pytest.raises(ValueError, match="no finished steps"):
        from_history(
            [],
            name="h",
            max_workers=1,
            steps_per_worker=1,
            start_delay=(1, 1),
            dynamic_share=0,
            seed=1,
        )


# -- the command --------------------------------------------------------------------------------


def test_the_built_in_run_meets_every_target_quickly(tmp_path: Path) -> None:
    started = time.monotonic()
    result = CliRunner().invoke(scaling, ["simulate", "--output-dir", str(tmp_path)])
    elapsed = time.monotonic() - started

    assert result.exit_code == 0, result.output
    assert elapsed < 60
    document = json.loads((tmp_path / "simulation.json").read_text())
    assert set(document["scenarios"]) == {"normal_day", "big_day"}
    for found in document["scenarios"].values():
        assert set(found["policies"]) == {
            "taskiq",
            "taskiq-previous",
            "target-tracking",
            "keda",
            "oracle",
        }
        for figures in found["policies"].values():
            for key in (
                "p50_wait_s",
                "p95_wait_s",
                "p99_wait_s",
                "worker_minutes",
                "steps_killed",
                "cold_pickup_s",
            ):
                assert key in figures
    targets = document["targets"]
    assert len(targets) == 10
    assert all(set(t) == {"name", "value", "limit", "holds"} and t["holds"] for t in targets)
    for name in ("normal_day", "big_day"):
        assert (tmp_path / f"{name}-busiest-hour.png").stat().st_size > 10_000
        assert f"PASS  {name}: taskiq p95 wait <= keda's" in result.output
    assert "| taskiq-previous |" in result.output


def test_a_target_that_does_not_hold_fails_the_command(tmp_path: Path) -> None:
    # An hour's scale-in window: idle workers for an hour after every burst.
    result = CliRunner().invoke(
        scaling,
        [
            "simulate",
            "--scenario",
            "normal_day",
            "--days",
            "1",
            "--window",
            "3600",
            "--output-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1, result.output
    assert "FAIL  normal_day:" in result.output
    document = json.loads((tmp_path / "simulation.json").read_text())
    assert not all(t["holds"] for t in document["targets"])


def test_the_same_seed_gives_the_same_figures() -> None:
    work = BUILT_IN["normal_day"](7, days=1)
    config = ScalingConfig(max_workers=work.max_workers, steps_per_worker=2)
    first, second = (
        report.figures(Simulation(work, TaskiqPolicy(config), seed=7).run()) for _ in range(2)
    )
    assert first == second
