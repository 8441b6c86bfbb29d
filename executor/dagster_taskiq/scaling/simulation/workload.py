"""What arrives: runs made of stages of steps, built in or read from the ledger's history.

A run launches its stages one after another: every step of a stage is queued when the last
step of the stage before it ends (a root, then its fan-out, then the step that collects).
A stage is ``known_ahead`` when the run's plan says how many steps it has before the stage
before it ends (a static fan-out); a dynamic fan-out is known only once its root ends.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

DAY = 86_400.0
HOUR = 3_600.0


@dataclass(frozen=True)
class Stage:
    durations: tuple[float, ...]  # seconds, one per step
    known_ahead: bool = True


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    arrives_at: float  # seconds from the start of the workload
    stages: tuple[Stage, ...]

    @property
    def steps(self) -> int:
        return sum(len(stage.durations) for stage in self.stages)


@dataclass(frozen=True)
class Scenario:
    """A workload and the pool it runs on."""

    name: str
    description: str
    runs: tuple[RunSpec, ...]
    max_workers: int
    steps_per_worker: int
    start_delay: tuple[float, float]  # a worker's start, seconds: uniform in [low, high]

    @property
    def steps(self) -> int:
        return sum(run.steps for run in self.runs)

    @property
    def span(self) -> float:
        """From the first arrival to the last (the simulation runs on past it)."""
        return max((run.arrives_at for run in self.runs), default=0.0)

    @property
    def mean_start_delay(self) -> float:
        return sum(self.start_delay) / 2


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return max(1.0, rng.lognormvariate(math.log(median), sigma))


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _office_hours_rate(at: float) -> float:
    """Relative arrival rate over a day: people launch runs in office hours."""
    hour = (at % DAY) / HOUR
    return 3.0 if 8 <= hour < 19 else 1.0


def _arrivals(rng: random.Random, runs_per_day: float) -> list[float]:
    """Ad hoc and sensor-driven arrivals: a Poisson process thinned to office hours."""
    peak = runs_per_day / (11 * 3.0 + 13 * 1.0) * 3.0 / HOUR  # per second, in office hours
    at, found = 0.0, list[float]()
    while True:
        at += rng.expovariate(peak)
        if at >= DAY:
            return found
        if rng.random() < _office_hours_rate(at) / 3.0:
            found.append(at)


def _run(
    rng: random.Random,
    run_id: str,
    at: float,
    *,
    fan_out: tuple[int, int],
    dynamic_share: float,
    step_median: tuple[float, float] = (10.0, 120.0),
) -> RunSpec:
    """One run: a single step, a short chain, or root -> fan-out -> collect."""
    median = _log_uniform(rng, *step_median)
    shape = rng.random()
    if shape < 0.25:
        stages = [Stage((_lognormal(rng, median, 0.7),))]
    elif shape < 0.45:
        stages = [Stage((_lognormal(rng, median, 0.7),)) for _ in range(rng.randint(2, 4))]
    else:
        size = round(_log_uniform(rng, *fan_out))
        stages = [
            Stage((_lognormal(rng, median / 2, 0.5),)),
            Stage(
                tuple(_lognormal(rng, median, 0.7) for _ in range(size)),
                known_ahead=rng.random() >= dynamic_share,
            ),
            Stage((_lognormal(rng, median / 2, 0.5),)),
        ]
    return RunSpec(run_id, at, tuple(stages))


def _day(
    rng: random.Random,
    prefix: str,
    *,
    offset: float,
    runs_per_day: float,
    dynamic_share: float,
) -> list[RunSpec]:
    """Scheduled runs (a few jobs on the hour and the half hour) and ad hoc ones."""
    starts = [hour * HOUR for hour in range(24)] + [hour * HOUR + 1800 for hour in range(0, 24, 2)]
    starts += _arrivals(rng, runs_per_day - len(starts))
    return [
        _run(rng, f"{prefix}-{i}", offset + at, fan_out=(4, 40), dynamic_share=dynamic_share)
        for i, at in enumerate(sorted(starts))
    ]


def _big_fan_outs(
    rng: random.Random, prefix: str, *, offset: float, count: int, dynamic_share: float
) -> list[RunSpec]:
    """Runs whose fan-out is 200 to 1000 steps, launched in the working day."""
    runs = []
    for i in range(count):
        median = _log_uniform(rng, 30.0, 180.0)
        size = rng.randint(200, 1000)
        stages = (
            Stage((_lognormal(rng, median, 0.5),)),
            Stage(
                tuple(_lognormal(rng, median, 0.7) for _ in range(size)),
                known_ahead=rng.random() >= dynamic_share,
            ),
            Stage((_lognormal(rng, median, 0.5),)),
        )
        runs.append(RunSpec(f"{prefix}-{i}", offset + rng.uniform(6 * HOUR, 20 * HOUR), stages))
    return runs


def normal_day(seed: int, *, days: int = 1, dynamic_share: float = 0.5) -> Scenario:
    runs: list[RunSpec] = []
    for day in range(days):
        rng = random.Random(f"normal-{seed}-{day}")
        runs += _day(
            rng, f"d{day}", offset=day * DAY, runs_per_day=180, dynamic_share=dynamic_share
        )
    return Scenario(
        name="normal_day",
        description=f"{days} seeded day(s) of 180 runs: single steps, chains, fan-outs of "
        "4 to 40 steps; max 10 workers",
        runs=tuple(sorted(runs, key=lambda run: run.arrives_at)),
        max_workers=10,
        steps_per_worker=2,
        start_delay=(30.0, 90.0),
    )


def big_day(seed: int, *, days: int = 1, dynamic_share: float = 0.5) -> Scenario:
    runs: list[RunSpec] = []
    for day in range(days):
        rng = random.Random(f"big-{seed}-{day}")
        offset = day * DAY
        runs += _day(rng, f"d{day}", offset=offset, runs_per_day=180, dynamic_share=dynamic_share)
        runs += _big_fan_outs(
            rng, f"d{day}-big", offset=offset, count=12, dynamic_share=dynamic_share
        )
    return Scenario(
        name="big_day",
        description=f"{days} seeded day(s) of the normal day plus 12 fan-outs of 200 to 1000 "
        "steps; max 50 workers",
        runs=tuple(sorted(runs, key=lambda run: run.arrives_at)),
        max_workers=50,
        steps_per_worker=2,
        start_delay=(30.0, 90.0),
    )


class Builder(Protocol):
    def __call__(self, seed: int, *, days: int = 1, dynamic_share: float = 0.5) -> Scenario: ...


BUILT_IN: dict[str, Builder] = {"normal_day": normal_day, "big_day": big_day}


@dataclass(frozen=True)
class StepRow:
    """One finished step attempt from the ledger."""

    run_id: str
    enqueued_at: datetime
    started_at: datetime
    finished_at: datetime


# Steps of one run queued within this long of each other belong to one stage.
STAGE_GAP_SECONDS = 1.0


def from_history(
    rows: Sequence[StepRow],
    *,
    name: str,
    max_workers: int,
    steps_per_worker: int,
    start_delay: tuple[float, float],
    dynamic_share: float,
    seed: int,
) -> Scenario:
    """Runs rebuilt from the ledger: a run's steps queued together form a stage, and each
    step keeps the duration it had. Which fan-outs were dynamic the ledger does not say:
    ``dynamic_share`` of the stages of more than one step are taken to be."""
    rng = random.Random(f"history-{seed}")
    by_run: dict[str, list[StepRow]] = {}
    for row in rows:
        by_run.setdefault(row.run_id, []).append(row)
    if not by_run:
        raise ValueError("The ledger has no finished steps in that period")
    origin = min(row.enqueued_at for row in rows)
    runs = []
    for run_id, steps in by_run.items():
        steps.sort(key=lambda row: row.enqueued_at)
        stages: list[list[StepRow]] = [[steps[0]]]
        for previous, row in itertools.pairwise(steps):
            gap = (row.enqueued_at - previous.enqueued_at).total_seconds()
            if gap > STAGE_GAP_SECONDS:
                stages.append([])
            stages[-1].append(row)
        runs.append(
            RunSpec(
                run_id,
                (steps[0].enqueued_at - origin).total_seconds(),
                tuple(
                    Stage(
                        tuple(
                            max(0.1, (row.finished_at - row.started_at).total_seconds())
                            for row in stage
                        ),
                        known_ahead=len(stage) == 1 or rng.random() >= dynamic_share,
                    )
                    for stage in stages
                ),
            )
        )
    runs.sort(key=lambda run: run.arrives_at)
    days = max(1.0, runs[-1].arrives_at / DAY)
    return Scenario(
        name=name,
        description=f"{len(runs)} runs from the ledger over {days:.1f} days; "
        f"max {max_workers} workers",
        runs=tuple(runs),
        max_workers=max_workers,
        steps_per_worker=steps_per_worker,
        start_delay=start_delay,
    )
