"""``dagster-taskiq scaling simulate``: compare scaling policies on seeded days or on the
ledger's own history, to choose ``max_workers``, targets and windows."""

from __future__ import annotations

import time
from pathlib import Path

import click

from dagster_taskiq.core.settings import ENV_DATABASE_URL

DEFAULT_OUTPUT_DIR = Path("scaling-results")


def _start_delay(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[float, float]:
    low, _, high = value.partition(":")
    try:
        bounds = (float(low), float(high or low))
    except ValueError:
        raise click.BadParameter("give seconds, or a range LOW:HIGH") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise click.BadParameter("give 0 <= LOW <= HIGH")
    return bounds


@click.group()
def scaling() -> None:
    """The scaling policy: compare it with others on simulated or recorded days."""


@scaling.command()
@click.option(
    "--scenario",
    "scenarios",
    type=click.Choice(["normal_day", "big_day"]),
    multiple=True,
    help="Built-in workloads to run; repeatable. Default: both.",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--days",
    type=click.FloatRange(min=0, min_open=True),
    default=3,
    show_default=True,
    help="Seeded days per built-in scenario; with the ledger, days of history.",
)
@click.option(
    "--endpoints",
    is_flag=True,
    help=f"Simulate the ledger's history instead: the database named by ${ENV_DATABASE_URL}.",
)
@click.option(
    "--database-url",
    help="Simulate this ledger's history instead (implies --endpoints).",
)
@click.option(
    "--queue-url",
    "queue_urls",
    multiple=True,
    help="With the ledger: only the steps sent to this queue (one pool's queues); repeatable.",
)
@click.option(
    "--max-workers",
    type=click.IntRange(1, 1000),
    help="The pool's max_workers. Default: the scenario's (10, 50; 10 for history).",
)
@click.option(
    "--steps-per-worker", type=click.IntRange(1, 64), help="Each worker's --concurrency. [2]"
)
@click.option(
    "--start-delay",
    default="30:90",
    show_default=True,
    callback=_start_delay,
    help="A worker's start, seconds: a value or a uniform range LOW:HIGH.",
)
@click.option("--target-backlog", type=click.IntRange(1), default=5, show_default=True)
@click.option(
    "--target-wait",
    type=click.FloatRange(0),
    help="State the target as seconds of expected wait instead "
    "(DAGSTER_TASKIQ_TARGET_WAIT_SECONDS).",
)
@click.option(
    "--window",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="The scale-in stabilization window of this project's policy, seconds.",
)
@click.option(
    "--lead",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="Count expected steps due within this long (about a worker's start).",
)
@click.option("--evaluations", type=click.IntRange(1, 12), default=3, show_default=True)
@click.option("--debounce", type=click.FloatRange(0), default=30.0, show_default=True)
@click.option(
    "--dynamic-share",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Share of fan-outs whose size is known only once their root ends.",
)
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_OUTPUT_DIR,
    show_default=True,
)
# click passes every option as a parameter.
def simulate(  # noqa: PLR0917
    scenarios: tuple[str, ...],
    seed: int,
    days: float,
    endpoints: bool,
    database_url: str | None,
    queue_urls: tuple[str, ...],
    max_workers: int | None,
    steps_per_worker: int | None,
    start_delay: tuple[float, float],
    target_backlog: int,
    target_wait: float | None,
    window: float,
    lead: float,
    evaluations: int,
    debounce: float,
    dynamic_share: float,
    output_dir: Path,
) -> None:
    """Run this project's scaling policy, its previous version, AWS target tracking, KEDA
    and an oracle on the same days; print the table and the targets' verdicts, write a JSON
    file and a picture of each scenario's busiest hour. Exits 1 when a target does not hold.
    """
    import dataclasses
    import os

    from dagster_taskiq.scaling.policy import ScalingConfig
    from dagster_taskiq.scaling.simulation import report
    from dagster_taskiq.scaling.simulation.run import PolicySettings, simulate, write_outputs
    from dagster_taskiq.scaling.simulation.workload import BUILT_IN, Scenario

    started = time.monotonic()
    built: list[Scenario] = []
    if endpoints or database_url:
        url = database_url or os.environ.get(ENV_DATABASE_URL)
        if not url:
            raise click.UsageError(f"--endpoints needs ${ENV_DATABASE_URL} (or --database-url)")
        if scenarios:
            raise click.UsageError("--scenario runs built-in days; drop it to use the ledger")
        from dagster_taskiq.scaling.simulation.history import read_history
        from dagster_taskiq.scaling.simulation.workload import from_history

        rows = read_history(url, days=days, queue_urls=queue_urls)
        try:
            built.append(
                from_history(
                    rows,
                    name="ledger_history",
                    max_workers=max_workers or 10,
                    steps_per_worker=steps_per_worker or 2,
                    start_delay=start_delay,
                    dynamic_share=dynamic_share,
                    seed=seed,
                )
            )
        except ValueError as e:
            raise click.ClickException(str(e)) from e
    else:
        if days != int(days):
            raise click.UsageError("--days is a whole number for the built-in scenarios")
        for name in scenarios or tuple(BUILT_IN):
            scenario = BUILT_IN[name](seed, days=int(days), dynamic_share=dynamic_share)
            built.append(
                dataclasses.replace(
                    scenario,
                    max_workers=max_workers or scenario.max_workers,
                    steps_per_worker=steps_per_worker or scenario.steps_per_worker,
                    start_delay=start_delay,
                )
            )
    try:
        config = ScalingConfig(
            target_backlog_per_worker=target_backlog,
            scale_in_stabilization_seconds=window,
            target_wait_seconds=target_wait,
            scale_out_lead_seconds=lead,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    settings = PolicySettings(config, evaluations=evaluations, debounce_seconds=debounce)

    results = [simulate(scenario, settings, seed=seed) for scenario in built]
    for result in results:
        scenario = result.scenario
        click.echo(
            f"\n{scenario.name}: {scenario.description}; {len(scenario.runs)} runs, "
            f"{scenario.steps} steps, workers start in "
            f"{scenario.start_delay[0]:g}-{scenario.start_delay[1]:g} s, "
            f"{scenario.steps_per_worker} steps per worker\n"
        )
        click.echo(report.table(result.figures))
        click.echo("")
        click.echo(report.verdicts(result.targets))
    written = write_outputs(results, output_dir, seed=seed)
    click.echo(f"\nwrote {', '.join(str(p) for p in written)}", err=True)
    click.echo(f"simulated in {time.monotonic() - started:.1f} s", err=True)
    if not all(t.holds for r in results for t in r.targets):
        raise SystemExit(1)
