"""``dagster-taskiq load SCENARIO`` and ``dagster-taskiq verify``.

Each scenario has its long form (the defaults, as in the original simulator's commands)
and a short form (``--short``, about a minute) for a laptop or CI; an option given on the
command line wins over both.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from dagster_taskiq.load import scenarios
from dagster_taskiq.load.scenarios import Plan

DEFAULT_STACK_DIR = Path(".dagster-taskiq") / "stack"
DEFAULT_RESULTS_DIR = Path("load-results")


def _common(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--short", is_flag=True, help="The short form: about a minute."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--max-workers", type=click.IntRange(1, 16), default=2, show_default=True),
        click.option(
            "--concurrency",
            type=click.IntRange(1, 8),
            default=2,
            show_default=True,
            help="Step processes per worker.",
        ),
        click.option(
            "--max-concurrent-runs",
            type=click.IntRange(1, 100),
            default=10,
            show_default=True,
            help="Runs executing at once; later ones wait in line.",
        ),
        click.option(
            "--output-dir",
            type=click.Path(path_type=Path),
            help=f"Default: {DEFAULT_RESULTS_DIR}/SCENARIO-TIME/.",
        ),
        click.option(
            "--stack-dir",
            type=click.Path(path_type=Path),
            default=DEFAULT_STACK_DIR,
            show_default=True,
            help="The local stack's data (PostgreSQL), kept for `verify`.",
        ),
        click.option(
            "--endpoints",
            is_flag=True,
            help="Load the queue, database and Dagster instance named by the environment "
            "(DAGSTER_TASKIQ_QUEUE_URL, DAGSTER_TASKIQ_DATABASE_URL, DAGSTER_HOME) "
            "instead of the local stack. Scenarios with faults need the local stack.",
        ),
        click.option("--drain-timeout", type=float, default=300.0, show_default=True),
        click.option(
            "--stuck-after",
            type=float,
            default=600.0,
            show_default=True,
            help="A run not finished this many seconds after submission is stuck.",
        ),
    ]
    return functools.reduce(lambda c, option: option(c), reversed(options), command)


def _pick(given: Any, short: bool, short_value: Any, long_value: Any) -> Any:
    if given is not None:
        return given
    return short_value if short else long_value


@click.group()
def load() -> None:
    """Put a scenario's load (and faults) on the executor; verify and draw the result."""


def _run(plan: Plan, options: dict[str, Any]) -> None:
    from dagster_taskiq.load.faults import FaultLog
    from dagster_taskiq.load.runner import LoadRunner, configured_target, local_target

    # EMF metric lines are for CloudWatch; on a terminal they would bury the progress.
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    output_dir = options["output_dir"] or DEFAULT_RESULTS_DIR / (
        f"{plan.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    faults = FaultLog()
    target_cm: contextlib.AbstractContextManager[Any]
    if options["endpoints"]:
        if plan.needs_local_stack:
            raise click.UsageError(
                f"{plan.scenario} kills, cuts or duplicates local processes and messages: "
                "it runs on the local stack only (drop --endpoints)."
            )
        target_cm = configured_target(dict(os.environ))
    else:
        target_cm = local_target(
            plan,
            faults,
            stack_dir=options["stack_dir"].resolve(),
            max_workers=options["max_workers"],
            concurrency=options["concurrency"],
        )
    try:
        with target_cm as target:
            runner = LoadRunner(
                plan,
                target,
                faults,
                output_dir=output_dir,
                max_concurrent_runs=options["max_concurrent_runs"],
                drain_timeout=options["drain_timeout"],
                stuck_after=options["stuck_after"],
            )
            result = runner.run()
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    summary = result.summary()
    click.echo(f"\n[load] written to {output_dir}/", err=True)
    click.echo(json.dumps(summary))
    sys.exit(1 if summary["problems"] else 0)


@load.command("steady-load")
@click.option("--jobs-per-minute", type=float)
@click.option("--duration", type=float, help="Seconds. Long form 300, short 60.")
@_common
def steady_load(jobs_per_minute: float | None, duration: float | None, **options: Any) -> None:
    """One fan-out job at a steady rate."""
    short = options["short"]
    _run(
        scenarios.steady_load(
            jobs_per_minute=_pick(jobs_per_minute, short, 12, 6),
            duration=_pick(duration, short, 60, 300),
            seed=options["seed"],
        ),
        options,
    )


@load.command("burst-load")
@click.option("--burst-size", type=click.IntRange(1))
@click.option("--burst-interval", type=float, help="Minutes between bursts.")
@click.option("--duration", type=float, help="Seconds. Long form 600, short 60.")
@_common
def burst_load(
    burst_size: int | None, burst_interval: float | None, duration: float | None, **options: Any
) -> None:
    """Bursts of jobs of every kind."""
    short = options["short"]
    _run(
        scenarios.burst_load(
            burst_size=_pick(burst_size, short, 5, 10),
            burst_interval_minutes=_pick(burst_interval, short, 0.5, 5),
            duration=_pick(duration, short, 60, 600),
            seed=options["seed"],
        ),
        options,
    )


@load.command("mixed-workload")
@click.option("--jobs-per-minute", type=float)
@click.option("--duration", type=float, help="Seconds. Long form 600, short 60.")
@_common
def mixed_workload(jobs_per_minute: float | None, duration: float | None, **options: Any) -> None:
    """Fast and slow jobs, fan-outs, a chain, a retried op and an op that fails."""
    short = options["short"]
    _run(
        scenarios.mixed_workload(
            jobs_per_minute=_pick(jobs_per_minute, short, 12, 6),
            duration=_pick(duration, short, 60, 600),
            seed=options["seed"],
        ),
        options,
    )


@load.command("worker-failure")
@click.option("--failure-burst-size", type=click.IntRange(1), help="Jobs per burst.")
@click.option("--recovery-interval", type=float, help="Minutes between bursts.")
@click.option("--kills-per-burst", type=click.IntRange(0), default=2, show_default=True)
@click.option("--duration", type=float, help="Seconds. Long form 600, short 60.")
@_common
def worker_failure(
    failure_burst_size: int | None,
    recovery_interval: float | None,
    kills_per_burst: int,
    duration: float | None,
    **options: Any,
) -> None:
    """Bursts of slow jobs while workers are SIGKILLed in the middle of steps."""
    short = options["short"]
    _run(
        scenarios.worker_failure(
            failure_burst_size=_pick(failure_burst_size, short, 6, 20),
            recovery_interval_minutes=_pick(recovery_interval, short, 0.5, 2),
            kills_per_burst=kills_per_burst,
            duration=_pick(duration, short, 60, 600),
            seed=options["seed"],
        ),
        options,
    )


@load.command("network-partition")
@click.option("--max-burst-size", type=click.IntRange(1))
@click.option("--every", type=float, help="Seconds between partitions (and bursts).")
@click.option("--duration", type=float, help="Seconds. Long form 600, short 60.")
@_common
def network_partition(
    max_burst_size: int | None, every: float | None, duration: float | None, **options: Any
) -> None:
    """Bursts of jobs while the workers lose SQS and PostgreSQL for a few seconds."""
    short = options["short"]
    _run(
        scenarios.network_partition(
            max_burst_size=_pick(max_burst_size, short, 3, 5),
            every_seconds=_pick(every, short, 20, 30),
            duration=_pick(duration, short, 60, 600),
            seed=options["seed"],
        ),
        options,
    )


@load.command("duplicate-delivery")
@click.option("--jobs-per-minute", type=float)
@click.option("--duration", type=float, help="Seconds. Long form 300, short 60.")
@_common
def duplicate_delivery(
    jobs_per_minute: float | None, duration: float | None, **options: Any
) -> None:
    """Every message delivered twice, and delivered messages sent again later."""
    short = options["short"]
    _run(
        scenarios.duplicate_delivery(
            jobs_per_minute=_pick(jobs_per_minute, short, 12, 12),
            duration=_pick(duration, short, 60, 300),
            seed=options["seed"],
        ),
        options,
    )


@contextlib.contextmanager
def _verification_endpoints(stack_dir: Path) -> Iterator[tuple[Any, str]]:
    """The instance and database of the environment, or of the local stack's data."""
    from dagster import DagsterInstance

    from dagster_taskiq.core.settings import ENV_DATABASE_URL

    url = os.environ.get(ENV_DATABASE_URL)
    if url and os.environ.get("DAGSTER_HOME"):
        instance = DagsterInstance.get()
        try:
            yield instance, url
        finally:
            instance.dispose()
        return
    from dagster_taskiq.local.stack import (
        DATABASE_NAME,
        create_database,
        embedded_postgres,
        write_dagster_yaml,
    )

    if not (stack_dir / "pgdata").is_dir():
        raise click.UsageError(
            f"No local stack data in {stack_dir}: run `dagster-taskiq load ...` first, or set "
            f"{ENV_DATABASE_URL} and DAGSTER_HOME to verify a deployed stack."
        )
    with embedded_postgres(stack_dir / "pgdata") as server_url:
        url = create_database(server_url, DATABASE_NAME)
        home = stack_dir / "dagster_home"
        write_dagster_yaml(home, url)
        instance = DagsterInstance.from_config(str(home))
        try:
            yield instance, url
        finally:
            instance.dispose()


@click.command()
@click.option("--load-id", help="Default: the latest load.")
@click.option("--output", type=click.Path(path_type=Path), help="Write the report here.")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json")
@click.option(
    "--stack-dir", type=click.Path(path_type=Path), default=DEFAULT_STACK_DIR, show_default=True
)
@click.option("--stuck-after", type=float, default=600.0, show_default=True)
def verify(
    load_id: str | None, output: Path | None, fmt: str, stack_dir: Path, stuck_after: float
) -> None:
    """Check a load: nothing lost, nothing completed twice, nothing run twice unexplained.

    Exits 1 when it finds a problem, and prints the summary as JSON."""
    from dagster_taskiq.load.sessions import Sessions
    from dagster_taskiq.load.verify import verify as verify_load

    with _verification_endpoints(stack_dir.resolve()) as (instance, url):
        sessions = Sessions(url)
        try:
            session = sessions.get(load_id)
        finally:
            sessions.dispose()
        if session is None:
            raise click.UsageError(f"No load {load_id or 'at all'} in this database.")
        report = verify_load(instance, url, session, stuck_after=stuck_after)
    if output is not None:
        report.write(output, fmt)
        click.echo(f"[verify] {len(report.steps)} step attempts written to {output}", err=True)
    for problem in report.problems:
        click.echo(f"[verify] {problem}", err=True)
    click.echo(json.dumps({"load_id": session.load_id, **report.summary}))
    sys.exit(1 if report.problems else 0)
