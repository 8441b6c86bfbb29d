"""A 10,000-step dynamic fan-out through the local stack, with 4 workers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.local.stack import LocalStack
from tests.conftest import REPO_ROOT, start_workers

WIDTH = 10_000
# The run worker's resident memory, at its peak: it holds the run's plan and known state
# (10,000 steps), never every message or event of the run.
RUN_WORKER_PEAK_MB = 512


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_ten_thousand_step_dynamic_fan_out_with_the_run_worker_s_memory_bounded(
    stack: LocalStack, ledger: Ledger
) -> None:
    start_workers(stack, 4)
    config = {"ops": {name: {"config": {"width": WIDTH}} for name in ("spread", "gather")}}
    # A run worker as a deployment runs it: its events are consumed, not kept.
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.run_job",
            "--stream",
            "dynamic_fanout_job",
            json.dumps(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
    )
    assert process.stdout is not None
    run_id = process.stdout.readline().strip().removeprefix("RUN_ID ")
    run_worker = psutil.Process(process.pid)
    peak = 0.0
    while process.poll() is None:
        try:
            peak = max(peak, run_worker.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            break
        time.sleep(1.0)
    assert process.wait() == 0, f"run {run_id} failed"
    assert peak <= RUN_WORKER_PEAK_MB, f"the run worker peaked at {peak:.0f} MB"
    records = ledger.for_run(run_id)
    assert len(records) == WIDTH + 2  # spread, the mapped steps, gather
    assert all(r.status is Status.SUCCEEDED for r in records)
