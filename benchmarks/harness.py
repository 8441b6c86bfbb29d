"""What every benchmark runs on: the local stack serving the benchmark jobs, and a timed
run of one of them. ``benchmarks.run`` and each measurement it also offers alone
(``cpu``, ``launches``, ``timeline``, ``worker_memory``) import it."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, execute_job

from benchmarks.jobs import reconstructable_job
from dagster_taskiq.local.stack import LocalStack, local_stack

REPO_ROOT = Path(__file__).resolve().parent.parent
# The same for every peer: Dagster's console logger off the terminal.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def timed_run(
    instance: DagsterInstance, workload: str, peer: str, run_config: dict[str, Any]
) -> float:
    run_config = {**run_config, **QUIET}
    started = time.perf_counter()
    result = execute_job(
        reconstructable_job(workload, peer), instance=instance, run_config=run_config
    )
    seconds = time.perf_counter() - started
    if not result.success:
        raise RuntimeError(f"{workload} on {peer} failed (run {result.run_id})")
    return seconds


def bench_stack(exits: contextlib.ExitStack) -> tuple[Path, LocalStack, DagsterInstance]:
    """The local stack in a temporary directory, serving the benchmark jobs, and its
    Dagster instance; all closed by ``exits``."""
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
    )
    root = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="dagster-bench-")))
    stack = exits.enter_context(local_stack(root, code_locations=("benchmarks.jobs",)))
    stack.apply_env()
    instance = DagsterInstance.get()
    exits.callback(instance.dispose)
    return root, stack, instance
