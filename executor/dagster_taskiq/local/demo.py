"""``make demo``: the demo job through the real executor, queue, workers and ledger.

The stack starts with no worker. The scaling policy sizes the pool (the executor's
step-triggered scale-out wakes it when the run queues its first steps), and the DLQ
processor watches the dead-letter queue. Progress and every scaling decision go to
stderr; last comes one line of JSON with the figures.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    execute_job,
    reconstructable,
)

from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.dead_letters.processor import DeadLetterResult
from dagster_taskiq.local.autoscale import LocalAutoscaler
from dagster_taskiq.local.stack import LocalStack, local_stack
from dagster_taskiq.scaling.policy import Reason, ScalingConfig
from dagster_taskiq.scaling.scaler import Evaluation


def say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def _first(instance: DagsterInstance, run_id: str, event_type: DagsterEventType) -> float | None:
    records = instance.get_records_for_run(run_id, of_type=event_type, limit=1).records
    return records[0].event_log_entry.timestamp if records else None


def summarize(
    instance: DagsterInstance,
    stack: LocalStack,
    autoscaler: LocalAutoscaler,
    run_id: str,
    wall_seconds: float,
) -> dict[str, Any]:
    run = instance.get_run_by_id(run_id)
    stats = instance.get_run_step_stats(run_id)
    ledger = Ledger(stack.database_url)
    try:
        records = ledger.for_run(run_id)
    finally:
        ledger.dispose()
    changes = [(at, e) for at, e, _ in autoscaler.evaluations if e.applied]
    first_queued = _first(instance, run_id, DagsterEventType.STEP_WORKER_STARTING)
    first_started = _first(instance, run_id, DagsterEventType.STEP_START)
    scale_out = [at for at, e in changes if e.decision.desired > e.decision.current]
    return {
        "run_id": run_id,
        "status": run.status.value if run else "UNKNOWN",
        "steps": len(stats),
        "succeeded": sum(1 for s in stats if s.status and s.status.value == "SUCCESS"),
        "failed": sum(1 for s in stats if s.status and s.status.value == "FAILURE"),
        "attempts": len(records),
        "retried_steps": len({r.step_key for r in records if r.attempt > 0}),
        "duplicates_suppressed": sum(r.duplicates_suppressed for r in records),
        "dead_lettered": sum(1 for r in records if r.status is Status.DEAD_LETTERED),
        "ledger": {s.value: n for s in Status if (n := sum(1 for r in records if r.status is s))},
        "max_workers": max((e.decision.desired for _, e in changes), default=0),
        "scaling_changes": len(changes),
        "first_scale_out_after_first_step_seconds": (
            round(scale_out[0] - first_queued, 2) if scale_out and first_queued else None
        ),
        # Includes a worker's cold start: Python, Dagster and the code location imports.
        "first_step_started_after_queued_seconds": (
            round(first_started - first_queued, 2) if first_started and first_queued else None
        ),
        "wall_seconds": round(wall_seconds, 2),
    }


def run_demo(*, max_workers: int = 2, concurrency: int = 1) -> int:
    from dagster_taskiq.local import demo_job

    def on_evaluation(evaluation: Evaluation, cause: str) -> None:
        decision = evaluation.decision
        if decision.changed or cause != "tick":
            say(f"scaler ({cause}): {decision.reason.value}: {decision.detail}")

    def on_dead_letter(result: DeadLetterResult) -> None:
        say(f"dead-letter processor: {result.outcome.value}: {result.detail}")

    # EMF metric lines are for CloudWatch; on a terminal they would bury the figures.
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    say("starting the local stack: embedded PostgreSQL, SQS emulator, queue and DLQ")
    with local_stack() as stack:
        pool = stack.worker_pool(concurrency=concurrency)
        config = ScalingConfig(
            max_workers=max_workers,
            steps_per_worker=concurrency,
            scale_in_stabilization_seconds=5,
        )
        autoscaler = stack.autoscale(pool, config, tick_seconds=2, on_evaluation=on_evaluation)
        stack.process_dead_letters(on_result=on_dead_letter)
        stack.apply_env()
        say(f"no worker yet; the scaler may start up to {max_workers}")
        instance = DagsterInstance.get()
        say("running demo_job through the taskiq executor")
        started = time.monotonic()
        result = execute_job(reconstructable(demo_job.demo_job), instance=instance)
        wall = time.monotonic() - started
        if not result.success:
            say("the run did not succeed; worker logs follow")
            print(pool.logs()[-20000:], file=sys.stderr)
        say("waiting for the scaler to scale in to zero")
        # A scale-in to zero that is recorded (a scale to zero mid-run does not count).
        autoscaler.wait_for_evaluation(
            lambda e: e.applied and e.decision.desired == 0 and pool.target == 0, timeout=60
        )
        # After the scale-in, so that the scaling figures include it.
        summary = summarize(instance, stack, autoscaler, result.run_id, wall)
        summary["scaled_in_to_zero"] = pool.target == 0
        say("stopping workers, SQS emulator and PostgreSQL")
        instance.dispose()
    print(json.dumps(summary), flush=True)
    ok = summary["status"] == DagsterRunStatus.SUCCESS.value
    return (
        0
        if ok
        and any(e.decision.reason is Reason.SCALE_FROM_ZERO for _, e, _ in autoscaler.evaluations)
        else 1
    )
