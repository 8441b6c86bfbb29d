"""``verify``: was every step of a load run exactly once, and did every run finish?

Three independent records are compared, per run and per step attempt:

- Dagster's event log: the step's endings (success, failure, up for retry);
- the ledger: attempts, deliveries, duplicates suppressed, fencing tokens, final status;
- the op bodies' own records (``executions``): each start and end, with the fencing
  token it ran under.

Problems (any one makes ``verify`` exit non-zero):

- ``completion_recorded_twice``: an attempt with more than one ending in the event log;
- ``unexplained_duplicate_execution``: an op body started twice under the same fencing
  token, its worker not killed;
- ``lost_step``: a step that should have succeeded and has no success, a step that was
  dead-lettered, or a step whose ledger record is unfinished in a finished run;
- ``run_stuck``: a run not finished ``stuck_after`` seconds after it was submitted;
- ``unexpected_run_status``: a run that ended otherwise than its job says it must.

A step executed again because its worker died mid-step (killed by the load), or because
its worker lost the step before recording an outcome (cut off until its lease ran out,
or given back after the database failed mid-write), is at-least-once execution working
as documented: it is counted and reported, and it is not a problem. So is a run launched
again because its run worker exited before the run started (the launcher writes each
time in the run's event log): counted per run, not a problem; a run that still did not
start is failed by the launcher, and is one.
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from dagster_taskiq.core.ledger import NON_TERMINAL, Ledger, Status, StepRecord
from dagster_taskiq.core.settings import ledger_url
from dagster_taskiq.load import executions
from dagster_taskiq.load.jobs import EXPECTED_STATUS
from dagster_taskiq.load.sessions import LOAD_TAG, RELAUNCHED, Session

ENDINGS = {
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
}
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
FINISHED_NAMES = {s.value for s in FINISHED}


@dataclass
class StepAttemptReport:
    run_id: str
    step_key: str
    attempt: int
    ledger_status: str | None
    deliveries: int
    fencing_token: int
    executions: int  # op body starts
    finished_executions: int  # op body ends
    reexecuted_after_worker_killed: int
    reexecuted_after_release: int
    unexplained_duplicate_executions: int
    duplicates_suppressed: int
    endings: int  # in the event log
    pickup_seconds: float | None
    step_seconds: float | None  # enqueued to finished
    problems: list[str] = field(default_factory=list)


@dataclass
class RunReport:
    run_id: str
    job: str
    status: str
    expected_status: str
    steps: int
    attempts: int
    deliveries: int
    executions: int
    duplicates_suppressed: int
    lost_steps: int
    run_worker_relaunches: int  # run workers launched again, the run not having started
    seconds: float | None  # submitted to finished
    problems: list[str] = field(default_factory=list)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        if len(ordered) == 1:
            return round(ordered[0], 3)
        return round(statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1], 3)

    return {"p50": at(50), "p95": at(95), "p99": at(99), "max": round(ordered[-1], 3)}


@dataclass
class Report:
    load_id: str
    scenario: str
    runs: list[RunReport]
    steps: list[StepAttemptReport]
    rejected_messages: int = 0

    @property
    def problems(self) -> list[str]:
        return [p for r in self.runs for p in r.problems] + [
            p for s in self.steps for p in s.problems
        ]

    @property
    def summary(self) -> dict[str, Any]:
        runs, steps = self.runs, self.steps
        statuses = Counter(r.status for r in runs)
        return {
            "runs": len(runs),
            "runs_by_status": dict(statuses),
            "runs_as_expected": sum(1 for r in runs if r.status == r.expected_status),
            "runs_not_finished": sum(1 for r in runs if r.status not in FINISHED_NAMES),
            "runs_stuck": sum(1 for r in runs for p in r.problems if p.startswith("run_stuck")),
            "run_workers_relaunched": sum(r.run_worker_relaunches for r in runs),
            "steps": len({(s.run_id, s.step_key) for s in steps}),
            "attempts": len(steps),
            "deliveries": sum(s.deliveries for s in steps),
            "executions": sum(s.executions for s in steps),
            "reexecuted_after_worker_killed": sum(s.reexecuted_after_worker_killed for s in steps),
            "reexecuted_after_release": sum(s.reexecuted_after_release for s in steps),
            "unexplained_duplicate_executions": sum(
                s.unexplained_duplicate_executions for s in steps
            ),
            "duplicates_suppressed": sum(s.duplicates_suppressed for s in steps),
            "completions_recorded_twice": sum(1 for s in steps if s.endings > 1),
            "lost_steps": sum(r.lost_steps for r in runs),
            "rejected_messages": self.rejected_messages,
            "pickup_latency_seconds": percentiles(
                [s.pickup_seconds for s in steps if s.pickup_seconds is not None]
            ),
            "step_latency_seconds": percentiles(
                [s.step_seconds for s in steps if s.step_seconds is not None]
            ),
            "run_latency_seconds": percentiles([r.seconds for r in runs if r.seconds is not None]),
            "problems": len(self.problems),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "load_id": self.load_id,
            "scenario": self.scenario,
            "ok": not self.problems,
            "summary": self.summary,
            "problems": self.problems,
            "runs": [asdict(r) for r in self.runs],
            "steps": [asdict(s) for s in self.steps],
        }

    def write(self, path: Path, fmt: str) -> None:
        if fmt == "json":
            path.write_text(json.dumps(self.as_dict(), indent=2, default=str) + "\n")
            return
        # CSV: one row per step attempt, with its run's figures beside it.
        runs = {r.run_id: r for r in self.runs}
        names = [n for n in StepAttemptReport.__dataclass_fields__ if n != "problems"]
        with open(path, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow([*names, "job", "run_status", "expected_status", "problems"])
            for step in self.steps:
                run = runs.get(step.run_id)
                values = asdict(step)
                writer.writerow(
                    [
                        *("" if values[n] is None else values[n] for n in names),
                        run.job if run else "",
                        run.status if run else "",
                        run.expected_status if run else "",
                        "; ".join(step.problems),
                    ]
                )


def _run_events(
    instance: DagsterInstance, run_id: str
) -> tuple[dict[str, list[DagsterEventType]], int]:
    """Each step's endings in the event log, in order; and how many times the run was
    launched again because its run worker exited before the run started."""
    records = instance.get_records_for_run(
        run_id, of_type={*ENDINGS, DagsterEventType.ENGINE_EVENT}, limit=100_000
    ).records
    endings: dict[str, list[DagsterEventType]] = defaultdict(list)
    engine_messages: list[str] = []
    for record in records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type is DagsterEventType.ENGINE_EVENT:
            engine_messages.append(entry.message)
        elif event.step_key is not None:
            endings[event.step_key].append(event.event_type)
    return endings, count_relaunches(engine_messages)


def count_relaunches(engine_messages: Iterable[str]) -> int:
    """The run workers launched again, from a run's engine events.

    Each relaunch event names its run worker, so one written twice (the write committed,
    its acknowledgement was lost to the same outage, and the launcher wrote it again)
    counts once.
    """
    return len({m for m in engine_messages if m.startswith(RELAUNCHED)})


def _attempt_endings(events: list[DagsterEventType], attempt: int) -> int:
    """How many endings belong to ``attempt``: each up-for-retry closes one attempt."""
    count, current = 0, 0
    for event_type in events:
        if current == attempt:
            count += 1
        if event_type is DagsterEventType.STEP_UP_FOR_RETRY:
            current += 1
    return count


def _classify_executions(rows: list[dict[str, Any]], killed_pids: set[int]) -> tuple[int, int, int]:
    """Each execution of an attempt but the last: (worker killed, released, unexplained).

    Released: a later claim took a higher fencing token, which the ledger grants only
    when the earlier holder never recorded a completion: its lease ran out (cut off),
    or its worker gave the step back after a fault before the ending was written.
    The same token twice is a broken protocol.
    """
    starts = [r for r in rows if r["phase"] == executions.START]
    killed = released = unexplained = 0
    for earlier, later in itertools.pairwise(starts):
        if earlier["worker_pid"] in killed_pids:
            killed += 1
        elif (
            earlier["fencing_token"] is not None
            and later["fencing_token"] is not None
            and later["fencing_token"] > earlier["fencing_token"]
        ):
            released += 1
        else:
            unexplained += 1
    return killed, released, unexplained


def _step_report(  # noqa: PLR0917 - one call site, arguments named there
    run_id: str,
    step_key: str,
    attempt: int,
    record: StepRecord | None,
    rows: list[dict[str, Any]],
    endings: int,
    killed_pids: set[int],
) -> StepAttemptReport:
    killed, released, unexplained = _classify_executions(rows, killed_pids)
    pickup = step = None
    if record is not None and record.started_at is not None:
        pickup = (record.started_at - record.enqueued_at).total_seconds()
    if record is not None and record.finished_at is not None:
        step = (record.finished_at - record.enqueued_at).total_seconds()
    report = StepAttemptReport(
        run_id=run_id,
        step_key=step_key,
        attempt=attempt,
        ledger_status=record.status.value if record else None,
        deliveries=record.deliveries if record else 0,
        fencing_token=record.fencing_token if record else 0,
        executions=sum(1 for r in rows if r["phase"] == executions.START),
        finished_executions=sum(1 for r in rows if r["phase"] == executions.END),
        reexecuted_after_worker_killed=killed,
        reexecuted_after_release=released,
        unexplained_duplicate_executions=unexplained,
        duplicates_suppressed=record.duplicates_suppressed if record else 0,
        endings=endings,
        pickup_seconds=round(pickup, 3) if pickup is not None else None,
        step_seconds=round(step, 3) if step is not None else None,
    )
    where = f"{run_id} {step_key} attempt {attempt}"
    if endings > 1:
        report.problems.append(f"completion_recorded_twice: {where} has {endings} endings")
    if unexplained:
        report.problems.append(
            f"unexplained_duplicate_execution: {where} ran its op body {report.executions} times"
        )
    if record is not None and record.status is Status.DEAD_LETTERED:
        report.problems.append(f"lost_step: {where} was dead-lettered: {record.error}")
    return report


def verify(
    instance: DagsterInstance,
    database_url: str,
    session: Session,
    *,
    stuck_after: float = 600.0,
) -> Report:
    records = instance.get_run_records(filters=RunsFilter(tags={LOAD_TAG: session.load_id}))
    run_ids = [r.dagster_run.run_id for r in records]
    ledger = Ledger(database_url, pool_size=1)
    engine = sa.create_engine(ledger_url(database_url), pool_size=1)
    try:
        ledger_rows = ledger.for_runs(run_ids)
        rejected = len(ledger.rejections())
        executions.ensure_tables(engine)
        body_rows = executions.rows_for_runs(engine, run_ids)
    finally:
        ledger.dispose()
        engine.dispose()
    by_attempt = {(r.run_id, r.step_key, r.attempt): r for r in ledger_rows}
    execution_rows: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in body_rows:
        execution_rows[(row["run_id"], row["step_key"], row["retry_number"])].append(row)

    # Every attempt either record knows of, by run and step.
    attempts_of: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for run_id, step_key, attempt in [*by_attempt, *execution_rows]:
        attempts_of[run_id][step_key].add(attempt)
    killed = session.killed_pids

    runs: list[RunReport] = []
    steps: list[StepAttemptReport] = []
    now = time.time()
    for record in sorted(records, key=lambda r: r.create_timestamp):
        run = record.dagster_run
        run_id = run.run_id
        endings, relaunches = _run_events(instance, run_id)
        keys = set(attempts_of[run_id]) | set(endings)
        run_steps: list[StepAttemptReport] = []
        for step_key in sorted(keys):
            for attempt in sorted(attempts_of[run_id].get(step_key, ())) or [0]:
                run_steps.append(
                    _step_report(
                        run_id,
                        step_key,
                        attempt,
                        by_attempt.get((run_id, step_key, attempt)),
                        execution_rows.get((run_id, step_key, attempt), []),
                        _attempt_endings(endings.get(step_key, []), attempt),
                        killed,
                    )
                )
        expected = EXPECTED_STATUS.get(run.job_name, DagsterRunStatus.SUCCESS.value)
        finished = run.status in FINISHED
        created = record.create_timestamp.timestamp()
        report = RunReport(
            run_id=run_id,
            job=run.job_name,
            status=run.status.value,
            expected_status=expected,
            steps=len(keys),
            attempts=len(run_steps),
            deliveries=sum(s.deliveries for s in run_steps),
            executions=sum(s.executions for s in run_steps),
            duplicates_suppressed=sum(s.duplicates_suppressed for s in run_steps),
            lost_steps=0,
            run_worker_relaunches=relaunches,
            seconds=round(record.end_time - created, 3) if record.end_time else None,
        )
        lost: set[str] = set()
        for step in run_steps:
            if any(p.startswith("lost_step") for p in step.problems):
                lost.add(step.step_key)
            elif finished and step.ledger_status in NON_TERMINAL:
                lost.add(step.step_key)
                step.problems.append(
                    f"lost_step: {run_id} {step.step_key} attempt {step.attempt} is "
                    f"{step.ledger_status} in the ledger after its run ended"
                )
        if finished and expected == DagsterRunStatus.SUCCESS.value:
            for step_key in sorted(keys - lost):
                if DagsterEventType.STEP_SUCCESS not in endings.get(step_key, []):
                    lost.add(step_key)
                    report.problems.append(
                        f"lost_step: {run_id} {step_key} should have succeeded and did not"
                    )
        report.lost_steps = len(lost)
        if not finished and now - created > stuck_after:
            report.problems.append(
                f"run_stuck: {run_id} ({run.job_name}) is {run.status.value} "
                f"{now - created:.0f} s after it was submitted"
            )
        elif finished and run.status.value != expected:
            relaunched = f" after {relaunches + 1} run workers" if relaunches else ""
            report.problems.append(
                f"unexpected_run_status: {run_id} ({run.job_name}) ended {run.status.value}"
                f"{relaunched}, expected {expected}"
            )
        runs.append(report)
        steps.extend(run_steps)
    return Report(session.load_id, session.scenario, runs, steps, rejected_messages=rejected)
