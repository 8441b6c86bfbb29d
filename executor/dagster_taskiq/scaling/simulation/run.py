"""One simulation run: every policy on every scenario, the figures and the targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dagster_taskiq.scaling.policy import ScalingConfig
from dagster_taskiq.scaling.simulation import report
from dagster_taskiq.scaling.simulation.engine import Policy, Simulation
from dagster_taskiq.scaling.simulation.oracle import OracleSimulation
from dagster_taskiq.scaling.simulation.policies import (
    KedaPolicy,
    TargetTrackingPolicy,
    TaskiqPolicy,
)
from dagster_taskiq.scaling.simulation.workload import Scenario

# The scale-in window the scaler had before decision 43, for the taskiq-previous row.
PREVIOUS_WINDOW_SECONDS = 300.0


@dataclass(frozen=True)
class PolicySettings:
    """How this project's scaler is set up: the scaler Lambda's and the executor's settings."""

    config: ScalingConfig
    evaluations: int = 3
    debounce_seconds: float = 30.0


def policies(scenario: Scenario, settings: PolicySettings) -> list[Policy]:
    config = dataclasses.replace(
        settings.config,
        max_workers=scenario.max_workers,
        steps_per_worker=scenario.steps_per_worker,
        min_workers=min(settings.config.min_workers, scenario.max_workers),
    )
    # The previous scaler had neither a wait target nor this window.
    previous = dataclasses.replace(
        config,
        scale_in_stabilization_seconds=PREVIOUS_WINDOW_SECONDS,
        target_wait_seconds=None,
    )
    evaluations, debounce = settings.evaluations, settings.debounce_seconds
    return [
        TaskiqPolicy(config, evaluations=evaluations, debounce_seconds=debounce),
        TaskiqPolicy(previous, previous=True, evaluations=evaluations, debounce_seconds=debounce),
        TargetTrackingPolicy(
            max_workers=scenario.max_workers, target=config.target_backlog_per_worker
        ),
        KedaPolicy(max_workers=scenario.max_workers),
    ]


@dataclass(frozen=True)
class ScenarioResult:
    scenario: Scenario
    simulations: tuple[Simulation, ...]
    figures: tuple[report.Figures, ...]
    targets: tuple[report.Target, ...]

    def by_policy(self) -> dict[str, report.Figures]:
        return {f.policy: f for f in self.figures}


def simulate(
    scenario: Scenario,
    settings: PolicySettings,
    *,
    seed: int,
    progress: Callable[[str], None] = lambda _: None,
) -> ScenarioResult:
    sims: list[Simulation] = []
    for policy in policies(scenario, settings):
        progress(f"{scenario.name}: {policy.name}")
        sims.append(Simulation(scenario, policy, seed=seed).run())
    progress(f"{scenario.name}: oracle")
    sims.append(OracleSimulation(scenario, seed=seed).run())
    found = tuple(report.figures(sim) for sim in sims)
    targets = report.targets(scenario.name, {f.policy: f for f in found})
    return ScenarioResult(scenario, tuple(sims), found, tuple(targets))


def write_outputs(results: Sequence[ScenarioResult], output_dir: Path, *, seed: int) -> list[Path]:
    """The JSON file and one picture of the busiest hour per scenario."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        ours = result.simulations[0]
        start = report.busiest_hour(ours)
        path = output_dir / f"{result.scenario.name}-busiest-hour.png"
        report.draw(
            result.simulations,
            path,
            title=f"{result.scenario.name}: the busiest hour",
            start=start,
        )
        written.append(path)
    document = {
        r.scenario.name: {
            "description": r.scenario.description,
            "runs": len(r.scenario.runs),
            "steps": r.scenario.steps,
            "max_workers": r.scenario.max_workers,
            "steps_per_worker": r.scenario.steps_per_worker,
            "start_delay_s": list(r.scenario.start_delay),
            "policies": {f.policy: dataclasses.asdict(f) for f in r.figures},
        }
        for r in results
    }
    path = output_dir / "simulation.json"
    report.write_json(
        path, seed=seed, scenarios=document, found=[t for r in results for t in r.targets]
    )
    written.append(path)
    return written
