"""Figures per policy, the targets, the table, the JSON file and the picture."""

from __future__ import annotations

import bisect
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dagster_taskiq.scaling.simulation.engine import Sample, Simulation
from dagster_taskiq.scaling.simulation.oracle import OracleSimulation
from dagster_taskiq.scaling.simulation.workload import HOUR

# A cold start counts as evaluated at once when an evaluation came within this long.
COLD_START_EVALUATION_SECONDS = 2.0


@dataclass(frozen=True)
class Figures:
    policy: str
    p50_wait_s: float
    p95_wait_s: float
    p99_wait_s: float
    mean_wait_s: float
    worker_minutes: float
    steps_killed: int
    cold_pickup_s: float | None  # median, from the first step queued with no worker
    cold_starts: int
    cold_starts_evaluated_within_2s: float | None  # share; None for a policy with no cold starts
    scaling_changes: int
    minutes_at_max_workers: float


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of sorted ``values``; 0 for none."""
    if not values:
        return 0.0
    rank = max(1, math.ceil(share * len(values)))
    return values[rank - 1]


def figures(sim: Simulation) -> Figures:
    waits = sorted(wait for step in sim.steps for wait in step.waits)
    if isinstance(sim, OracleSimulation):
        worker_seconds = sim.worker_seconds
        cold_pickup, evaluated = None, None
    else:
        worker_seconds = sum(
            (w.stopped_at if w.stopped_at is not None else sim.now) - w.requested_at
            for w in sim.all_workers
        )
        cold = sim.cold_starts
        pickups = [s.started_at - s.first_queued_at for s in cold if s.started_at is not None]
        cold_pickup = statistics.median(pickups) if pickups else None
        evaluations = sim.evaluations
        within = 0
        for step in cold:
            index = bisect.bisect_left(evaluations, step.first_queued_at)
            if (
                index < len(evaluations)
                and evaluations[index] - step.first_queued_at <= COLD_START_EVALUATION_SECONDS
            ):
                within += 1
        evaluated = within / len(cold) if cold else 1.0
    return Figures(
        policy=sim.policy.name,
        p50_wait_s=round(percentile(waits, 0.50), 2),
        p95_wait_s=round(percentile(waits, 0.95), 2),
        p99_wait_s=round(percentile(waits, 0.99), 2),
        mean_wait_s=round(statistics.fmean(waits), 2) if waits else 0.0,
        worker_minutes=round(worker_seconds / 60, 1),
        steps_killed=sim.killed,
        cold_pickup_s=None if cold_pickup is None else round(cold_pickup, 1),
        cold_starts=len(sim.cold_starts),
        cold_starts_evaluated_within_2s=None if evaluated is None else round(evaluated, 4),
        scaling_changes=sim.changes,
        minutes_at_max_workers=round(sim.at_max_seconds / 60, 1),
    )


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    limit: float
    holds: bool


def targets(
    scenario: str, by_policy: dict[str, Figures], *, policy: str = "taskiq"
) -> list[Target]:
    """The targets of issue 16 for ``policy`` on one scenario."""
    ours, keda, oracle = by_policy[policy], by_policy["keda"], by_policy["oracle"]
    ratio = ours.worker_minutes / oracle.worker_minutes if oracle.worker_minutes else math.inf
    evaluated = ours.cold_starts_evaluated_within_2s
    evaluated = 1.0 if evaluated is None else evaluated
    return [
        Target(
            f"{scenario}: {policy} p95 wait <= keda's",
            ours.p95_wait_s,
            keda.p95_wait_s,
            ours.p95_wait_s <= keda.p95_wait_s,
        ),
        Target(
            f"{scenario}: {policy} worker-minutes <= keda's",
            ours.worker_minutes,
            keda.worker_minutes,
            ours.worker_minutes <= keda.worker_minutes,
        ),
        Target(
            f"{scenario}: {policy} busy steps killed", ours.steps_killed, 0, ours.steps_killed == 0
        ),
        Target(
            f"{scenario}: {policy} cold starts evaluated within 2 s (share)",
            evaluated,
            0.99,
            evaluated >= 0.99,
        ),
        Target(
            f"{scenario}: {policy} worker-minutes / oracle's",
            round(ratio, 3),
            1.15,
            ratio <= 1.15,
        ),
    ]


COLUMNS = (
    ("policy", "policy"),
    ("p50_wait_s", "p50 wait s"),
    ("p95_wait_s", "p95 wait s"),
    ("p99_wait_s", "p99 wait s"),
    ("mean_wait_s", "mean wait s"),
    ("worker_minutes", "worker-min"),
    ("steps_killed", "killed"),
    ("cold_pickup_s", "cold pick-up s"),
    ("scaling_changes", "changes"),
    ("minutes_at_max_workers", "min at max"),
)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    return str(value)


def table(rows: Sequence[Figures]) -> str:
    """A Markdown table, one row per policy."""
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        values = asdict(row)
        lines.append("| " + " | ".join(_cell(values[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def _figure(value: float) -> str:
    return f"{value:g}"


def verdicts(found: Sequence[Target]) -> str:
    return "\n".join(
        f"{'PASS' if t.holds else 'FAIL'}  {t.name}: {_figure(t.value)} (limit {_figure(t.limit)})"
        for t in found
    )


def write_json(
    path: Path,
    *,
    seed: int,
    scenarios: dict[str, dict[str, object]],
    found: Sequence[Target],
) -> None:
    document = {
        "seed": seed,
        "scenarios": scenarios,
        "targets": [asdict(t) for t in found],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def busiest_hour(sim: Simulation) -> float:
    """The start of the hour (on the hour) in which most steps were queued."""
    counts: dict[int, int] = {}
    for step in sim.steps:
        hour = int(step.first_queued_at // HOUR)
        counts[hour] = counts.get(hour, 0) + 1
    if not counts:
        return 0.0
    return max(counts, key=lambda hour: (counts[hour], -hour)) * HOUR


def _window(samples: Sequence[Sample], start: float) -> list[Sample]:
    return [s for s in samples if start <= s.at < start + HOUR]


def draw(sims: Sequence[Simulation], path: Path, *, title: str, start: float) -> None:
    """Queue and workers of each policy over one hour, one panel per policy."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sims), 1, sharex=True, figsize=(11, 2.2 * len(sims) + 1))
    fig.suptitle(title)
    for axis, sim in zip(axes, sims, strict=True):
        samples = _window(sim.samples, start)
        minutes = [(s.at - start) / 60 for s in samples]
        axis.plot(minutes, [s.visible for s in samples], label="steps waiting", color="tab:red")
        axis.plot(minutes, [s.in_flight for s in samples], label="steps running", color="tab:green")
        workers = axis.twinx()
        workers.step(
            minutes, [s.workers for s in samples], where="post", label="workers", color="tab:blue"
        )
        workers.set_ylabel("workers")
        axis.set_ylabel(sim.policy.name)
        axis.grid(alpha=0.3)
        if axis is axes[0]:
            lines = axis.get_legend_handles_labels()
            more = workers.get_legend_handles_labels()
            axis.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize="small")
    day, hour = divmod(int(start // HOUR), 24)
    axes[-1].set_xlabel(f"minutes from {hour:02d}:00 on day {day + 1}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
