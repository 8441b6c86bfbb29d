"""The modules the Lambdas import must not import dagster: the Lambda bundles stay small."""

from __future__ import annotations

import subprocess
import sys

import pytest

DAGSTER_FREE = [
    "dagster_taskiq",
    "dagster_taskiq.messages",
    "dagster_taskiq.ledger",
    "dagster_taskiq.queue",
    "dagster_taskiq.routing",
    "dagster_taskiq.schema",
    "dagster_taskiq.settings",
    "dagster_taskiq.observability",
    "dagster_taskiq.worker.attempt_context",
    # The worker's supervisor: Dagster is imported by its step processes only.
    "dagster_taskiq.worker.run",
    "dagster_taskiq.worker.supervisor",
    "dagster_taskiq.worker.step_process",
    "dagster_taskiq.worker.fork_server",
    "dagster_taskiq.worker.tasks",
    # The scaler Lambda reads the expected steps and durations through it.
    "dagster_taskiq.outlook",
    # The scaling simulator: an operator's tool that needs no Dagster.
    "dagster_taskiq.simulation.commands",
    "dagster_taskiq.simulation.run",
    # The operator's commands: only `runs show` reads Dagster's event log, on demand.
    "dagster_taskiq.operations.commands",
    # The migrations, run by the supervisor and the CLI.
    "dagster_taskiq.migrations",
    "dagster_taskiq.health",
]


@pytest.mark.parametrize("module", DAGSTER_FREE)
def test_module_does_not_import_dagster(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "loaded = sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.'))\n"
        "print(','.join(loaded))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.strip() == "", f"{module} imports {completed.stdout.strip()}"
