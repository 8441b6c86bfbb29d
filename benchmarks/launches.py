"""Launch throughput and the database statements of a waiting run, alone:
``python -m benchmarks.launches`` (about two minutes).

- **Launch throughput**: one run worker launches ``fanout_1000``'s 1000 steps with no
  worker consuming, with launches one at a time (``batch_launches: false``, the path
  before batching) then batched, in three such rounds; the figures are the medians, and
  each round's ratio is kept beside them. Steps a second = steps / the time from the
  executor's first event ("Starting execution with step handler", from the run's event
  log) to when the last step's STEP_WORKER_STARTING is stored (this process counts them
  every 10 ms). The run is then killed and its queue deleted.
- **Statements per waiting run**: a run of one step that sleeps (``wait_10``) on one
  warm worker. The run worker counts every statement it sends (SQLAlchemy's
  ``before_cursor_execute`` on all its engines, and each connection check before use);
  the figure is the count per second from 1 s after the step started to 1 s before it
  ended. Measured once waiting on notifications and once polling
  (``listen_for_events: false``, the path before).

Both run the run worker in a child process of this one, on the benchmark's local stack.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import sqlalchemy as sa
from dagster import DagsterEventType, DagsterInstance, RunsFilter, execute_job

from benchmarks.harness import QUIET, bench_stack
from benchmarks.jobs import reconstructable_job
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.local.stack import LocalStack, WorkerPool

LAUNCH_WORKLOAD = "fanout_1000"
LAUNCH_STEPS = 1000  # the fan-in waits on the others and is not launched
WAIT_WORKLOAD = "wait_10"
LAUNCH_ROUNDS = 3
OLD_LAUNCHES = {"batch_launches": False}
OLD_WAITING = {"listen_for_events": False}


def say(text: str) -> None:
    print(f"[launches] {text}", file=sys.stderr, flush=True)


# -- the child: a run worker ----------------------------------------------------------


def count_statements(stamps: list[float]) -> None:
    """Append the wall time of every statement this process sends to ``stamps``."""
    import sqlalchemy as sa
    from sqlalchemy.engine.default import DefaultDialect

    def executed(*_: Any) -> None:
        stamps.append(time.time())

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", executed)
    ping = DefaultDialect._do_ping_w_event

    def counted_ping(self: DefaultDialect, dbapi_connection: Any) -> bool:
        stamps.append(time.time())
        return ping(self, dbapi_connection)

    DefaultDialect._do_ping_w_event = counted_ping  # type: ignore[method-assign]


def child(workload: str, config: dict[str, Any], stamps_file: Path | None) -> None:
    stamps: list[float] = []
    if stamps_file is not None:
        count_statements(stamps)
    instance = DagsterInstance.get()
    try:
        execute_job(
            reconstructable_job(workload, "taskiq"),
            instance=instance,
            run_config={**QUIET, "execution": {"config": config}},
        )
    finally:
        if stamps_file is not None:
            stamps_file.write_text(json.dumps(stamps))
        instance.dispose()


def start_child(
    workload: str, config: dict[str, Any], stamps_file: Path | None = None
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "benchmarks.launches", "--child", workload, json.dumps(config)]
    if stamps_file is not None:
        command.append(str(stamps_file))
    return subprocess.Popen(command)


# -- the parent -------------------------------------------------------------------------


def _newest_run_id(instance: DagsterInstance, job_name: str, after: set[str]) -> str | None:
    runs = instance.get_runs(RunsFilter(job_name=job_name), limit=5)
    fresh = [r.run_id for r in runs if r.run_id not in after]
    return fresh[0] if fresh else None


def _event_times(instance: DagsterInstance, run_id: str, kind: DagsterEventType) -> list[float]:
    records = instance.get_records_for_run(run_id, of_type=kind, limit=100_000).records
    return [r.event_log_entry.timestamp for r in records]


def _stored(ledger: Ledger, run_id: str, event_type: str) -> int:
    count = sa.text(
        "SELECT count(*) FROM event_logs WHERE run_id = :run AND dagster_event_type = :kind"
    )
    with ledger.transaction() as conn:
        return int(conn.execute(count, {"run": run_id, "kind": event_type}).scalar_one())


def _execution_started(instance: DagsterInstance, run_id: str) -> float:
    for record in instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=50
    ).records:
        if (record.event_log_entry.user_message or "").startswith("Starting execution with"):
            return record.event_log_entry.timestamp
    raise RuntimeError(f"run {run_id} has no start of execution")


def launch_throughput(
    instance: DagsterInstance, stack: LocalStack, config: dict[str, Any], timeout: float = 180
) -> dict[str, float]:
    """Steps a second one run worker launches, with no worker consuming (on a queue of
    its own, deleted afterwards)."""
    job_name = f"{LAUNCH_WORKLOAD}__taskiq"
    known = {r.run_id for r in instance.get_runs(RunsFilter(job_name=job_name))}
    queue_url, dlq_url = stack.add_queue(f"launches-{uuid.uuid4().hex[:6]}")
    ledger = Ledger(stack.database_url, pool_size=1)
    process = start_child(LAUNCH_WORKLOAD, {**config, "queue_url": queue_url})
    try:
        deadline = time.monotonic() + timeout
        run_id = None
        while run_id is None:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the run did not start")
            run_id = _newest_run_id(instance, job_name, known)
            time.sleep(0.05)
        # Done when the last step's event is stored (a count, cheap enough to ask often).
        while _stored(ledger, run_id, "STEP_WORKER_STARTING") < LAUNCH_STEPS:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the launches did not finish (run {run_id})")
            time.sleep(0.01)
        seconds = time.time() - _execution_started(instance, run_id)
    finally:
        process.kill()
        process.wait()
        ledger.dispose()
        client = boto3.client("sqs", endpoint_url=stack.sqs_endpoint)
        for url in (queue_url, dlq_url):
            client.delete_queue(QueueUrl=url)
    return {"steps": LAUNCH_STEPS, "seconds": round(seconds, 3)}


def statements_while_waiting(
    instance: DagsterInstance, config: dict[str, Any], root: Path
) -> dict[str, float]:
    """Statements a second the run worker sends while its one step sleeps."""
    job_name = f"{WAIT_WORKLOAD}__taskiq"
    known = {r.run_id for r in instance.get_runs(RunsFilter(job_name=job_name))}
    stamps_file = Path(tempfile.mkstemp(dir=root, suffix=".json")[1])
    process = start_child(WAIT_WORKLOAD, config, stamps_file)
    if process.wait() != 0:
        raise RuntimeError(f"{WAIT_WORKLOAD} failed")
    run_id = _newest_run_id(instance, job_name, known)
    assert run_id is not None
    (started,) = _event_times(instance, run_id, DagsterEventType.STEP_START)
    (ended,) = _event_times(instance, run_id, DagsterEventType.STEP_SUCCESS)
    low, high = started + 1.0, ended - 1.0
    stamps = json.loads(stamps_file.read_text())
    count = sum(1 for stamp in stamps if low <= stamp <= high)
    return {
        "statements": count,
        "seconds": round(high - low, 3),
        "per_s": round(count / (high - low), 2),
    }


def measure(
    instance: DagsterInstance,
    stack: LocalStack,
    root: Path,
    pool: WorkerPool,
    *,
    waiting: bool = True,
    rounds: int = LAUNCH_ROUNDS,
) -> dict[str, Any]:
    """The figures ``benchmarks.run`` adds to its report (top-level keys). ``pool`` runs
    the waiting run's step, and is stopped while the launches are measured. The launch
    figures are medians over ``rounds`` rounds, each the old path then the batched one."""
    report: dict[str, Any] = {}
    if waiting:
        pool.scale_to(1)
        for name, config in (("before", OLD_WAITING), ("after", {})):
            say(f"statements while a run waits, {name}")
            report[f"waiting_{name}"] = statements_while_waiting(instance, config, root)
        report["statements_per_waiting_run_per_s"] = report["waiting_after"]["per_s"]
        report["statements_per_waiting_run_per_s_before"] = report["waiting_before"]["per_s"]
    size = pool.target
    pool.scale_to(0)
    rates: dict[str, list[float]] = {"before": [], "after": []}
    try:
        # Alternated: the old path's figure follows the machine's commit latency, which
        # drifts over a minute; a pair measured back to back shares the drift.
        for round_ in range(1, rounds + 1):
            for name, config in (("before", OLD_LAUNCHES), ("after", {})):
                say(f"launching {LAUNCH_STEPS} steps, {name} ({round_} of {rounds})")
                figures = launch_throughput(instance, stack, config)
                report.setdefault(f"launches_{name}", []).append(figures)
                rates[name].append(round(figures["steps"] / figures["seconds"], 1))
    finally:
        pool.scale_to(size)
    report["launch_steps_per_s"] = statistics.median(rates["after"])
    report["launch_steps_per_s_before"] = statistics.median(rates["before"])
    report["launch_ratio_by_round"] = [
        round(after / before, 2)
        for before, after in zip(rates["before"], rates["after"], strict=True)
    ]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--no-waiting", action="store_true", help="launch throughput only")
    parser.add_argument("--rounds", type=int, default=LAUNCH_ROUNDS, help="launch rounds")
    args = parser.parse_args()
    if args.child:
        workload, config, *stamps = args.child
        child(workload, json.loads(config), Path(stamps[0]) if stamps else None)
        return
    with contextlib.ExitStack() as exits:
        root, stack, instance = bench_stack(exits)
        pool = stack.worker_pool(concurrency=2)
        report = measure(
            instance, stack, root, pool, waiting=not args.no_waiting, rounds=args.rounds
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
