"""``dagster-taskiq``: the worker, the demo, the local stack and ledger maintenance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import click

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.messages import DEFAULT_MAX_STEP_ARGS_BYTES
from dagster_taskiq.core.settings import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ENV_CODE_LOCATIONS,
    ENV_CONCURRENCY,
    ENV_DATABASE_URL,
    ENV_ENDPOINT_URL,
    ENV_MAX_STEP_ARGS_BYTES,
    ENV_PRIORITY_QUEUE_URL,
    ENV_QUEUE_URL,
    ENV_REGION,
    ENV_SIGNING_KEY,
    ENV_SIGNING_KEY_SECRET_ARN,
    ENV_STEP_PROCESS_START,
)

max_workers_option = click.option(
    "--max-workers",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="The most workers the scaler may start.",
)


@click.group()
@click.version_option(package_name="dagster-taskiq")
def cli() -> None:
    """A Dagster executor on warm ECS Fargate workers fed by SQS."""


def _urls(given: tuple[str, ...], env_var: str) -> tuple[str, ...]:
    if given:
        return given
    return tuple(u.strip() for u in os.environ.get(env_var, "").split(",") if u.strip())


@cli.command()
@click.option(
    "--queue-url",
    "queue_urls",
    multiple=True,
    help=f"Queue to consume; repeatable. [${ENV_QUEUE_URL}, comma-separated]",
)
@click.option(
    "--priority-queue-url",
    "priority_queue_urls",
    multiple=True,
    help="Priority lane to consume first; repeatable. "
    f"[${ENV_PRIORITY_QUEUE_URL}, comma-separated]",
)
@click.option(
    "--priority-ratio",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Receives that serve the priority lanes first for each one that serves the other "
    "queues first, so that they are never starved.",
)
@click.option(
    "--concurrency",
    envvar=ENV_CONCURRENCY,
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help=f"Step processes, each running one step at a time. [${ENV_CONCURRENCY}]",
)
@click.option(
    "--database-url",
    envvar=ENV_DATABASE_URL,
    help=f"Ledger database. Default: the Dagster instance's PostgreSQL. [${ENV_DATABASE_URL}]",
)
@click.option(
    "--code-location",
    "code_locations",
    multiple=True,
    help="Module name or Python file whose jobs this worker runs; repeatable. "
    f"[${ENV_CODE_LOCATIONS}, comma-separated]",
)
@click.option(
    "--signing-key",
    envvar=ENV_SIGNING_KEY,
    help=f"Accept only signed messages. [${ENV_SIGNING_KEY}]",
)
@click.option(
    "--signing-key-secret-arn",
    envvar=ENV_SIGNING_KEY_SECRET_ARN,
    help="Accept only signed messages, with the key read from this Secrets Manager secret. "
    f"[${ENV_SIGNING_KEY_SECRET_ARN}]",
)
@click.option("--aws-region", envvar=ENV_REGION, help=f"[${ENV_REGION}]")
@click.option(
    "--endpoint-url", envvar=ENV_ENDPOINT_URL, help=f"SQS endpoint override. [${ENV_ENDPOINT_URL}]"
)
@click.option(
    "--max-heartbeat-interval",
    type=click.FloatRange(0.5, 60),
    default=10.0,
    show_default=True,
    help="Renew a running step's lease at least this often (seconds), so that a cancel "
    "lands quickly; a third of the lease if that is sooner.",
)
@click.option(
    "--max-steps-per-process",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Recycle a step process after this many steps, to bound memory.",
)
@click.option(
    "--step-process-start",
    envvar=ENV_STEP_PROCESS_START,
    type=click.Choice(["fork-server", "spawn"]),
    default="fork-server",
    show_default=True,
    help="Fork step processes from a process that imported Dagster and the code locations "
    "once (they share its memory and start in milliseconds), or spawn each, to import them "
    f"itself. [${ENV_STEP_PROCESS_START}]",
)
@click.option(
    "--wait-seconds",
    type=click.IntRange(0, 20),
    default=20,
    show_default=True,
    help="SQS long-poll wait.",
)
@click.option(
    "--stop-timeout",
    type=float,
    default=100.0,
    show_default=True,
    help="Seconds running steps get to finish after SIGTERM before they are given back.",
)
@click.option("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, show_default=True)
@click.option(
    "--max-step-args-bytes",
    envvar=ENV_MAX_STEP_ARGS_BYTES,
    type=click.IntRange(1024),
    default=DEFAULT_MAX_STEP_ARGS_BYTES,
    show_default=True,
    help="Reject a message whose step arguments inflate to more than this; memory stays "
    f"within it. [${ENV_MAX_STEP_ARGS_BYTES}]",
)
def worker(
    queue_urls: tuple[str, ...],
    priority_queue_urls: tuple[str, ...],
    priority_ratio: int,
    concurrency: int,
    database_url: str | None,
    code_locations: tuple[str, ...],
    signing_key: str | None,
    signing_key_secret_arn: str | None,
    aws_region: str | None,
    endpoint_url: str | None,
    max_heartbeat_interval: float,
    max_steps_per_process: int,
    step_process_start: str,
    wait_seconds: int,
    stop_timeout: float,
    max_message_bytes: int,
    max_step_args_bytes: int,
) -> None:
    """Run steps from the given queues in warm step processes."""
    from dagster_taskiq.worker.config import CodeLocation, WorkerSettings
    from dagster_taskiq.worker.run import run_worker

    locations = tuple(CodeLocation(c) for c in code_locations) or CodeLocation.parse_many(
        os.environ.get(ENV_CODE_LOCATIONS)
    )
    if not locations:
        raise click.UsageError(
            "No code location: pass --code-location MODULE_OR_FILE (repeatable) or set "
            f"{ENV_CODE_LOCATIONS}. A worker runs only jobs from the code it is given."
        )
    queues = _urls(queue_urls, ENV_QUEUE_URL)
    lanes = _urls(priority_queue_urls, ENV_PRIORITY_QUEUE_URL)
    if not queues and not lanes:
        raise click.UsageError(
            f"No queue: pass --queue-url URL (repeatable) or set {ENV_QUEUE_URL}."
        )
    try:
        settings = WorkerSettings(
            queue_urls=queues,
            priority_queue_urls=lanes,
            priority_ratio=priority_ratio,
            database_url=database_url or "",
            code_locations=locations,
            region=aws_region,
            endpoint_url=endpoint_url,
            concurrency=concurrency,
            signing_key=signing_key,
            signing_key_secret_arn=signing_key_secret_arn,
            max_heartbeat_interval=max_heartbeat_interval,
            max_steps_per_process=max_steps_per_process,
            step_process_start=step_process_start,
            wait_seconds=wait_seconds,
            stop_timeout=stop_timeout,
            max_message_bytes=max_message_bytes,
            max_step_args_bytes=max_step_args_bytes,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    try:
        sys.exit(run_worker(settings))
    except ConfigurationError as e:
        raise click.ClickException(str(e)) from e


@cli.command()
@max_workers_option
@click.option("--concurrency", type=click.IntRange(1, 8), default=1, show_default=True)
def demo(max_workers: int, concurrency: int) -> None:
    """Run the demo job on the local stack and print its figures as JSON."""
    from dagster_taskiq.local.demo import run_demo

    sys.exit(run_demo(max_workers=max_workers, concurrency=concurrency))


@cli.command()
@max_workers_option
@click.option("--port", type=int, default=3000, show_default=True)
def ui(max_workers: int, port: int) -> None:
    """The local stack, scaled by the policy, and the Dagster UI on it (Ctrl-C stops all)."""
    from dagster_taskiq.local.stack import local_stack
    from dagster_taskiq.scaling.policy import ScalingConfig

    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")  # EMF is for CloudWatch
    with local_stack() as stack:
        pool = stack.worker_pool()

        def show(evaluation: Any, cause: str) -> None:
            if evaluation.decision.changed:
                click.echo(f"[scaler] ({cause}) {evaluation.decision.detail}", err=True)

        stack.autoscale(
            pool,
            ScalingConfig(max_workers=max_workers, scale_in_stabilization_seconds=60),
            tick_seconds=10,
            on_evaluation=show,
        )
        stack.process_dead_letters(dagster_ui_url=f"http://127.0.0.1:{port}")
        stack.apply_env()
        click.echo(
            f"Local stack up: queue {stack.queue_url}; workers start when steps arrive "
            f"(at most {max_workers}).",
            err=True,
        )
        click.echo(
            f"To operate it from another shell: export DAGSTER_TASKIQ_LOCAL_STACK={stack.root}, "
            "then dagster-taskiq status (or runs, dlq, logs).",
            err=True,
        )
        click.echo(f"Open http://127.0.0.1:{port} and launch demo_job.", err=True)
        command = [
            sys.executable, "-m", "dagster", "dev",
            "-m", "dagster_taskiq.local.demo_job", "-p", str(port), "-h", "127.0.0.1",
        ]  # fmt: skip
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        dev = subprocess.Popen(command, env=os.environ.copy())
        while dev.poll() is None and not stop.wait(0.5):
            pass
        if dev.poll() is None:
            dev.terminate()
            try:
                dev.wait(30)
            except subprocess.TimeoutExpired:
                dev.kill()
        click.echo("Stopping workers, SQS emulator and PostgreSQL.", err=True)
        pool.stop()


@cli.group()
def ledger() -> None:
    """Ledger maintenance."""


@ledger.command("cleanup")
@click.option("--database-url", envvar=ENV_DATABASE_URL, required=True)
def ledger_cleanup(database_url: str) -> None:
    """Delete finished step records past their TTL."""
    from dagster_taskiq.core.ledger import Ledger

    store = Ledger(database_url)
    started = time.monotonic()
    deleted = store.cleanup_expired()
    click.echo(f"deleted {deleted} expired records in {time.monotonic() - started:.2f} s")


@ledger.command("upgrade")
@click.option("--database-url", envvar=ENV_DATABASE_URL, required=True)
def ledger_upgrade(database_url: str) -> None:
    """Bring the ledger's schema to this release's revision (safe to repeat, and to run
    while workers and runs use the ledger: every revision only adds)."""
    from dagster_taskiq.core.errors import LedgerUnavailable
    from dagster_taskiq.core.ledger import Ledger
    from dagster_taskiq.core.migrations import upgrade_ledger
    from dagster_taskiq.core.schema import SchemaStatus

    store = Ledger(database_url)
    try:
        before, after = upgrade_ledger(store)
    except LedgerUnavailable as e:
        raise click.ClickException(str(e)) from e
    finally:
        store.dispose()
    if after.status is SchemaStatus.NEWER:
        raise click.ClickException(
            f"The ledger is at revision {after.revision}, newer than this release knows; "
            "use the release that upgraded it."
        )
    if before == after:
        click.echo(f"The ledger is current: {after.describe()}.")
    else:
        click.echo(f"Upgraded the ledger from {before.describe()} to revision {after.revision}.")


def _add_load_commands() -> None:
    from dagster_taskiq.load.commands import load, verify

    cli.add_command(load)
    cli.add_command(verify)


_add_load_commands()

from dagster_taskiq.scaling.simulation.commands import scaling  # noqa: E402 (after the CLI group it joins)

cli.add_command(scaling)


def _add_operations_commands() -> None:
    from dagster_taskiq.operations.commands import dlq, logs, runs, status

    for command in (status, runs, dlq, logs):
        cli.add_command(command)


_add_operations_commands()

from dagster_taskiq.operations.doctor.command import doctor  # noqa: E402 (after the CLI group it joins)

cli.add_command(doctor)


def main() -> None:
    cli()
