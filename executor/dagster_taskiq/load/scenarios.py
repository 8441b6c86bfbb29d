"""The load scenarios, as plans: what to submit when, and which faults to inject when.

A plan is plain data made from the scenario's parameters and a seeded random generator,
so the same command makes the same load, and the plans are tested without a stack.
Intervals between bursts are in minutes, as in the original simulator's commands
(``burst-load --burst-size 10 --burst-interval 5 --duration 600``: 10 jobs every 5
minutes for 10 minutes); fractions of a minute are allowed.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field
from typing import Any


class FaultKind(enum.StrEnum):
    KILL_WORKER = "kill_worker"  # SIGKILL a worker that is running a step
    PARTITION = "partition"  # cut the workers' connections to SQS and PostgreSQL
    DUPLICATES = "duplicates"  # send again messages that were already delivered
    RESTART_DATABASE = "restart_database"  # stop and start PostgreSQL
    SQS_OUTAGE = "sqs_outage"  # the SQS endpoint refuses every connection


@dataclass(frozen=True)
class Submission:
    at: float  # seconds from the start of the load
    job: str
    run_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Fault:
    at: float
    kind: FaultKind
    seconds: float = 0.0  # how long it lasts, for faults with a duration
    count: int = 1  # how many, for faults that come in numbers
    # Held back (a minute at most) until every run submitted so far has started: for a
    # fault meant for the executor and the workers, not for Dagster's own run start.
    once_runs_started: bool = False


@dataclass(frozen=True)
class Plan:
    scenario: str
    duration: float
    submissions: tuple[Submission, ...]
    faults: tuple[Fault, ...] = ()
    duplicate_copies: int = 1  # each message delivered this many times (1: no relay)
    lease_seconds: int = 20  # the executor's visibility_timeout for these runs
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_local_stack(self) -> bool:
        return bool(self.faults) or self.duplicate_copies > 1


def _work(seconds: float) -> dict[str, Any]:
    return {"ops": {"quick": {"config": {"seconds": seconds}}}}


def fast(seconds: float = 0.2) -> tuple[str, dict[str, Any]]:
    return "fast_job", _work(seconds)


def slow(seconds: float) -> tuple[str, dict[str, Any]]:
    return "slow_job", {"ops": {"sleepy": {"config": {"seconds": seconds}}}}


def fanout(width: int, seconds: float = 0.2) -> tuple[str, dict[str, Any]]:
    return "fanout_job", {
        "ops": {"split": {"config": {"width": width}}, "part": {"config": {"seconds": seconds}}}
    }


def mix(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """Fast and slow jobs, fan-outs, a chain, a retried op and an op that fails."""
    choices: list[tuple[float, tuple[str, dict[str, Any]]]] = [
        (0.30, fast()),
        (0.15, slow(rng.uniform(2.0, 6.0))),
        (0.25, fanout(rng.randint(4, 12))),
        (0.10, ("chain_job", {})),
        (0.10, ("retry_job", {})),
        (0.10, ("failing_job", {})),
    ]
    pick = rng.random()
    for weight, choice in choices:
        pick -= weight
        if pick <= 0:
            return choice
    return choices[0][1]


def _every(interval: float, duration: float) -> list[float]:
    return [i * interval for i in range(max(1, math.ceil(duration / interval)))]


def _at_rate(jobs_per_minute: float, duration: float) -> list[float]:
    if jobs_per_minute <= 0:
        raise ValueError("--jobs-per-minute must be positive")
    return _every(60.0 / jobs_per_minute, duration)


def _submit(at: float, choice: tuple[str, dict[str, Any]]) -> Submission:
    return Submission(at=round(at, 3), job=choice[0], run_config=choice[1])


def steady_load(*, jobs_per_minute: float, duration: float, seed: int = 0) -> Plan:
    """One fan-out job at a steady rate."""
    times = _at_rate(jobs_per_minute, duration)
    return Plan(
        "steady-load",
        duration,
        tuple(_submit(t, fanout(4)) for t in times),
        parameters={"jobs_per_minute": jobs_per_minute, "duration": duration, "seed": seed},
    )


def burst_load(
    *, burst_size: int, burst_interval_minutes: float, duration: float, seed: int = 0
) -> Plan:
    """``burst_size`` jobs at once, every ``burst_interval_minutes``."""
    rng = random.Random(seed)
    times = _every(burst_interval_minutes * 60.0, duration)
    submissions = [_submit(t, mix(rng)) for t in times for _ in range(burst_size)]
    return Plan(
        "burst-load",
        duration,
        tuple(submissions),
        parameters={
            "burst_size": burst_size,
            "burst_interval_minutes": burst_interval_minutes,
            "duration": duration,
            "seed": seed,
        },
    )


def mixed_workload(*, duration: float, jobs_per_minute: float = 6.0, seed: int = 0) -> Plan:
    """Every kind of job, in a seeded random order, at a steady rate."""
    rng = random.Random(seed)
    times = _at_rate(jobs_per_minute, duration)
    return Plan(
        "mixed-workload",
        duration,
        tuple(_submit(t, mix(rng)) for t in times),
        parameters={"jobs_per_minute": jobs_per_minute, "duration": duration, "seed": seed},
    )


def worker_failure(
    *,
    failure_burst_size: int,
    recovery_interval_minutes: float,
    duration: float,
    kills_per_burst: int = 2,
    seed: int = 0,
) -> Plan:
    """Bursts of ``failure_burst_size`` jobs with slow steps; while they run, workers in
    the middle of a step are SIGKILLed; then ``recovery_interval_minutes`` to recover."""
    rng = random.Random(seed)
    submissions: list[Submission] = []
    faults: list[Fault] = []
    for start in _every(recovery_interval_minutes * 60.0, duration):
        for _ in range(failure_burst_size):
            choice = slow(rng.uniform(2.0, 5.0)) if rng.random() < 0.5 else fanout(6, 1.0)
            submissions.append(_submit(start, choice))
        for k in range(kills_per_burst):
            faults.append(Fault(round(start + 4.0 + 5.0 * k, 3), FaultKind.KILL_WORKER))
    return Plan(
        "worker-failure",
        duration,
        tuple(submissions),
        tuple(faults),
        lease_seconds=10,
        parameters={
            "failure_burst_size": failure_burst_size,
            "recovery_interval_minutes": recovery_interval_minutes,
            "kills_per_burst": kills_per_burst,
            "duration": duration,
            "seed": seed,
        },
    )


def network_partition(
    *,
    max_burst_size: int,
    duration: float,
    partition_seconds: tuple[float, float] = (2.0, 8.0),
    every_seconds: float = 30.0,
    seed: int = 0,
) -> Plan:
    """Bursts of 1 to ``max_burst_size`` jobs; every ``every_seconds``, the workers lose
    SQS and PostgreSQL for a random while in ``partition_seconds``."""
    rng = random.Random(seed)
    submissions: list[Submission] = []
    faults: list[Fault] = []
    for start in _every(every_seconds, duration):
        for _ in range(rng.randint(1, max_burst_size)):
            submissions.append(_submit(start, mix(rng)))
        cut_at = start + rng.uniform(2.0, every_seconds / 2)
        faults.append(Fault(round(cut_at, 3), FaultKind.PARTITION, rng.uniform(*partition_seconds)))
    return Plan(
        "network-partition",
        duration,
        tuple(submissions),
        tuple(faults),
        lease_seconds=15,
        parameters={
            "max_burst_size": max_burst_size,
            "partition_seconds": list(partition_seconds),
            "every_seconds": every_seconds,
            "duration": duration,
            "seed": seed,
        },
    )


def duplicate_delivery(*, duration: float, jobs_per_minute: float = 12.0, seed: int = 0) -> Plan:
    """Every message delivered twice, and delivered messages sent again every 10 s."""
    rng = random.Random(seed)
    times = _at_rate(jobs_per_minute, duration)
    return Plan(
        "duplicate-delivery",
        duration,
        tuple(_submit(t, mix(rng)) for t in times),
        tuple(Fault(t + 5.0, FaultKind.DUPLICATES, count=5) for t in _every(10.0, duration)),
        duplicate_copies=2,
        parameters={"jobs_per_minute": jobs_per_minute, "duration": duration, "seed": seed},
    )


SCENARIOS = (
    "steady-load",
    "burst-load",
    "mixed-workload",
    "worker-failure",
    "network-partition",
    "duplicate-delivery",
)
