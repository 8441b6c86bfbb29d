"""The idle worker's memory and how soon a new step process is ready:
``python -m benchmarks.worker_memory`` (about a minute; ``--step-process-start spawn``
for the path before the fork server).

- **Idle PSS**: one worker with 2 step processes, warmed by a few runs, then idle; the
  proportional set size of each of its processes (supervisor, fork server, step
  processes, multiprocessing's resource tracker when steps are spawned), summed. PSS
  divides each shared page between the processes that map it, so the sum is what the
  worker holds (what a Fargate task is charged), where summed RSS counts a shared page
  once per process.
- **Step process ready**: a worker with 1 step process recycled after every step
  (``--max-steps-per-process 1``) runs one-step runs; each recycle's time from the
  supervisor's request to the new process's "ready", from the worker's log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import uuid
from typing import Any

import boto3
import psutil
from dagster import DagsterInstance, execute_job

from benchmarks.harness import QUIET, bench_stack
from benchmarks.jobs import reconstructable_job
from dagster_taskiq.local.stack import LocalStack, WorkerPool
from dagster_taskiq.worker.fork_server import FORK_SERVER_NAME, STEP_PROCESS_NAME

READY_SAMPLES = 20


def say(text: str) -> None:
    print(f"[worker-memory] {text}", file=sys.stderr, flush=True)


def role(process: psutil.Process, worker_pid: int) -> str:
    """What a process of a worker is: its name says it for the worker's own processes."""
    if process.pid == worker_pid:
        return "supervisor"
    name = process.name()
    if name == FORK_SERVER_NAME:
        return "fork_server"
    if name == STEP_PROCESS_NAME:
        return "step_process"
    command = " ".join(process.cmdline())
    return "resource_tracker" if "resource_tracker" in command else "step_process"


def pss_by_process(worker_pid: int) -> list[dict[str, Any]]:
    """PSS (and USS, RSS) in MB of the worker and every process under it."""
    worker = psutil.Process(worker_pid)
    rows = []
    for each in [worker, *worker.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            info = each.memory_full_info()
            rows.append(
                {
                    "pid": each.pid,
                    "role": role(each, worker_pid),
                    "pss": round(getattr(info, "pss", info.uss) / 2**20, 1),
                    "uss": round(info.uss / 2**20, 1),
                    "rss": round(info.rss / 2**20, 1),
                }
            )
    return rows


def idle_pss(worker_pid: int) -> dict[str, Any]:
    """``worker_idle_pss_mb`` (the sum) and its parts by role."""
    rows = pss_by_process(worker_pid)
    by_role: dict[str, float] = {}
    for row in rows:
        by_role[row["role"]] = round(by_role.get(row["role"], 0.0) + row["pss"], 1)
    return {
        "worker_idle_pss_mb": round(sum(row["pss"] for row in rows), 1),
        "worker_idle_pss_mb_by_role": by_role,
        "worker_idle_processes": rows,
    }


def _run(instance: DagsterInstance, workload: str, queue_url: str | None = None) -> None:
    run_config: dict[str, Any] = dict(QUIET)
    if queue_url is not None:
        run_config["execution"] = {"config": {"queue_url": queue_url}}
    result = execute_job(
        reconstructable_job(workload, "taskiq"), instance=instance, run_config=run_config
    )
    if not result.success:
        raise RuntimeError(f"{workload} failed (run {result.run_id})")


def ready_times_ms(pool: WorkerPool, *, starts: tuple[str, ...] = ("recycled",)) -> list[float]:
    """Request-to-ready times of the pool's step processes, from its workers' logs."""
    times = []
    for line in pool.logs().splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("message") == "Step process ready" and record.get("start") in starts:
                times.append(float(record["ready_ms"]))
    return times


def step_process_ready(
    instance: DagsterInstance, stack: LocalStack, samples: int = READY_SAMPLES, *, start: str = ""
) -> dict[str, Any]:
    """``step_process_ready_ms``: p50 of recycled step processes' request-to-ready times,
    on a worker (and a queue) of its own that recycles its one step process after every
    step."""
    queue_url, dlq_url = stack.add_queue(f"recycling-{uuid.uuid4().hex[:6]}")
    args: tuple[str, ...] = ("--queue-url", queue_url, "--max-steps-per-process", "1")
    if start:
        args += ("--step-process-start", start)
    pool = stack.worker_pool(name="recycling", concurrency=1, extra_args=args)
    pool.scale_to(1)
    try:
        deadline = time.monotonic() + 120
        while not ready_times_ms(pool, starts=("first",)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no step process became ready:\n{pool.logs()[-3000:]}")
            time.sleep(0.2)
        for _ in range(samples):
            _run(instance, "single", queue_url)
        deadline = time.monotonic() + 30
        while len(ready_times_ms(pool)) < samples and time.monotonic() < deadline:
            time.sleep(0.2)  # the last recycle happens after the run ends
        times = ready_times_ms(pool)
    finally:
        pool.scale_to(0)
        client = boto3.client("sqs", endpoint_url=stack.sqs_endpoint)
        for url in (queue_url, dlq_url):
            client.delete_queue(QueueUrl=url)
    if not times:
        raise RuntimeError("no recycled step process in the worker's log")
    ordered = sorted(times)
    return {
        "step_process_ready_ms": round(statistics.median(ordered), 1),
        "step_process_ready_ms_p95": round(ordered[int(0.95 * (len(ordered) - 1))], 1),
        "step_process_ready_samples": len(ordered),
    }


def measure(
    instance: DagsterInstance,
    stack: LocalStack,
    *,
    worker_pid: int | None = None,
    start: str = "",
    samples: int = READY_SAMPLES,
) -> dict[str, Any]:
    """The figures ``benchmarks.run`` adds to its report (top-level keys): the idle PSS of
    ``worker_pid`` (idle now), or of a worker with 2 step processes started and warmed
    here; and the ready time of recycled step processes, on a worker of its own."""
    report: dict[str, Any] = {}
    if worker_pid is None:
        args = ("--step-process-start", start) if start else ()
        pool = stack.worker_pool(name="idle", concurrency=2, extra_args=args)
        pool.scale_to(1)
        try:
            say("warming a worker with 2 step processes")
            for workload in ("single", "chain_20", "chain_20"):
                _run(instance, workload)
            time.sleep(3)  # idle
            report.update(idle_pss(pool.processes[0].pid))
        finally:
            pool.scale_to(0)
    else:
        report.update(idle_pss(worker_pid))
    say(f"recycling a step process after each of {samples} steps")
    report.update(step_process_ready(instance, stack, samples, start=start))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--step-process-start", choices=("fork-server", "spawn"), default="")
    parser.add_argument("--samples", type=int, default=READY_SAMPLES)
    args = parser.parse_args()
    with contextlib.ExitStack() as exits:
        _, stack, instance = bench_stack(exits)
        report = measure(instance, stack, start=args.step_process_start, samples=args.samples)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
