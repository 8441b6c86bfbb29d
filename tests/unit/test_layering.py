"""The package's layering: checked statically by import-linter, and at import time here.

The contracts in ``pyproject.toml`` (``[tool.importlinter]``) are the boundary: what the
Lambdas import never imports Dagster, even in a function; the folders are layered by the data
flow; no folder has an import cycle. The second check is about processes, not code: these
modules run in processes that must not pay for importing Dagster (the supervisor, the
operator's commands), so importing them must not load it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    completed = subprocess.run(
        [str(lint_imports), "--no-cache"],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "3 kept, 0 broken" in completed.stdout


DAGSTER_FREE = [
    "dagster_taskiq",
    "dagster_taskiq.core.messages",
    "dagster_taskiq.core.ledger",
    "dagster_taskiq.core.sqs",
    "dagster_taskiq.core.routing",
    "dagster_taskiq.core.schema",
    "dagster_taskiq.core.settings",
    "dagster_taskiq.core.observability",
    "dagster_taskiq.worker.attempt_context",
    # The worker's supervisor: Dagster is imported by its step processes only.
    "dagster_taskiq.worker.run",
    "dagster_taskiq.worker.supervisor",
    "dagster_taskiq.worker.step_process",
    "dagster_taskiq.worker.fork_server",
    "dagster_taskiq.worker.tasks",
    # The scaler Lambda reads the expected steps and durations through it.
    "dagster_taskiq.scaling.outlook",
    # The scaling simulator: an operator's tool that needs no Dagster.
    "dagster_taskiq.scaling.simulation.commands",
    "dagster_taskiq.scaling.simulation.run",
    # The operator's commands: only `runs show` reads Dagster's event log, on demand.
    "dagster_taskiq.operations.commands",
    # The migrations, run by the supervisor and the CLI.
    "dagster_taskiq.core.migrations",
    "dagster_taskiq.core.health",
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
