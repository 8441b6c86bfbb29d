"""``dagster-taskiq doctor``: one line per check, PASS, FAIL or SKIP, with the fix for each
failure; ``--json`` for a machine. Exits 1 when a check fails.

Importing this module imports no Dagster: the CLI starts fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dagster_taskiq.core.settings import (
    ENV_DATABASE_URL,
    ENV_LOCAL_STACK,
    ENV_QUEUE_URL,
    ENV_STACK_OUTPUTS,
)
from dagster_taskiq.operations.doctor import DEFAULT_CANARY_TIMEOUT

if TYPE_CHECKING:
    from dagster_taskiq.operations.doctor.run import DoctorReport


def load_executor_config(path: Path) -> dict[str, Any]:
    """The executor's config from a YAML (or JSON) file: the mapping under the job's
    ``execution: config:``, or a whole run config holding it."""
    import yaml  # type: ignore[import-untyped]

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise click.BadParameter(f"cannot read {path}: {e}", param_hint="--executor-config") from e
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} holds no mapping", param_hint="--executor-config")
    execution = data.get("execution")
    if isinstance(execution, dict):
        # A run config: `execution: {config: {...}}`.
        inner = execution.get("config", {})
        data = inner if isinstance(inner, dict) else {}
    return {str(key): value for key, value in data.items()}


def render(report: DoctorReport) -> str:
    """The report as lines: status, check, detail, and for a failure its fix."""
    width = max((len(check.name) for check in report.checks), default=0)
    lines = [f"dagster-taskiq doctor: {report.deployment}"]
    for check in report.checks:
        line = f"{check.outcome.value}  {check.name:<{width}}  {check.detail}"
        if check.fix and not check.ok:
            line += f" Fix: {check.fix}"
        lines.append(line)
    counts: Mapping[str, int] = {
        outcome: sum(1 for c in report.checks if c.outcome.value == outcome)
        for outcome in ("PASS", "FAIL", "SKIP")
    }
    lines.append(
        f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
        + ("" if report.ok else ": not ready")
    )
    return "\n".join(lines)


@click.command(
    help="Check every wire from where the run worker runs, then send a canary step.\n\n"
    "Run it with the run worker's environment (DAGSTER_HOME, the executor's variables), "
    "or with the deployment named as for `status`: on AWS the stack's outputs "
    f"(${ENV_QUEUE_URL}, ..., or ${ENV_STACK_OUTPUTS}), a local stack's directory in "
    f"${ENV_LOCAL_STACK}. Exits 1 when a check fails."
)
@click.option(
    "--executor-config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file with the executor's config, as the run worker's job has it (the mapping "
    "under `execution: config:`, or a run config holding it). Default: the environment "
    "alone, as the executor reads it.",
)
@click.option("--queue-url", help=f"The default queue, over the config. [${ENV_QUEUE_URL}]")
@click.option(
    "--database-url", help=f"The ledger's database, over the config. [${ENV_DATABASE_URL}]"
)
@click.option(
    "--canary-timeout",
    type=click.FloatRange(1),
    default=DEFAULT_CANARY_TIMEOUT,
    show_default=True,
    help="Seconds the canary step may wait for a worker; enough for a Fargate cold start.",
)
@click.option("--no-canary", is_flag=True, help="Check the wires only; send no canary step.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
def doctor(  # noqa: PLR0917 (click passes every option as a parameter)
    config_path: Path | None,
    queue_url: str | None,
    database_url: str | None,
    canary_timeout: float,
    no_canary: bool,
    as_json: bool,
) -> None:
    from dagster_taskiq.operations.doctor.run import DoctorOptions, run_doctor

    options = DoctorOptions(
        executor_config=load_executor_config(config_path) if config_path else {},
        queue_url=queue_url,
        database_url=database_url,
        canary=not no_canary,
        canary_timeout=canary_timeout,
    )
    report = run_doctor(options)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        click.echo(render(report))
    sys.exit(0 if report.ok else 1)
