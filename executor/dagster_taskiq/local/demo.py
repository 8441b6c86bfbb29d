"""``make demo``: the demo job through the real executor, queue, workers and ledger.

Prints progress to stderr and, last, one line of JSON with the figures.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus, execute_job, reconstructable

from dagster_taskiq.ledger import Ledger, Status
from dagster_taskiq.local.stack import LocalStack, local_stack


def summarize(stack: LocalStack, run_id: str, wall_seconds: float) -> dict[str, Any]:
    instance = DagsterInstance.get()
    run = instance.get_run_by_id(run_id)
    stats = instance.get_run_step_stats(run_id)
    ledger = Ledger(stack.database_url)
    try:
        records = ledger.for_run(run_id)
    finally:
        ledger.dispose()
    return {
        "run_id": run_id,
        "status": run.status.value if run else "UNKNOWN",
        "steps": len(stats),
        "succeeded": sum(1 for s in stats if s.status and s.status.value == "SUCCESS"),
        "failed": sum(1 for s in stats if s.status and s.status.value == "FAILURE"),
        "attempts": len(records),
        "retried_steps": len({r.step_key for r in records if r.attempt > 0}),
        "duplicates_suppressed": sum(r.duplicates_suppressed for r in records),
        "ledger": {
            s.value: sum(1 for r in records if r.status is s)
            for s in Status
            if any(r.status is s for r in records)
        },
        "workers": sum(pool.size for pool in stack.pools),
        "wall_seconds": round(wall_seconds, 2),
    }


def run_demo(*, workers: int = 2, concurrency: int = 1) -> int:
    from dagster_taskiq.local import demo_job

    def say(text: str) -> None:
        print(f"[demo] {text}", file=sys.stderr, flush=True)

    say("starting the local stack: embedded PostgreSQL, SQS emulator, queue and DLQ")
    with local_stack() as stack:
        stack.apply_env()
        pool = stack.worker_pool(concurrency=concurrency)
        pool.scale_to(workers)
        say(f"started {workers} workers (each with {concurrency} step process)")
        instance = DagsterInstance.get()
        say("running demo_job through the taskiq executor")
        started = time.monotonic()
        result = execute_job(reconstructable(demo_job.demo_job), instance=instance)
        wall = time.monotonic() - started
        summary = summarize(stack, result.run_id, wall)
        if summary["status"] != DagsterRunStatus.SUCCESS.value:
            say("the run did not succeed; worker logs follow")
            print(pool.logs()[-20000:], file=sys.stderr)
        say("stopping workers, SQS emulator and PostgreSQL")
        pool.stop()
        instance.dispose()
    print(json.dumps(summary), flush=True)
    return 0 if summary["status"] == DagsterRunStatus.SUCCESS.value else 1
