"""Every fault at once, on the real stack, for a bounded couple of minutes.

Several runs of many steps; meanwhile workers are SIGKILLed in the middle of steps, every
message is delivered twice and delivered ones are sent again, PostgreSQL is restarted
once, and SQS is unreachable for a while for workers and executor alike. Then ``verify``
must find nothing lost, nothing completed twice, every op body run once per attempt
except where its worker died mid-step, and every run finished within the bound.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

from dagster_taskiq.cli import cli
from dagster_taskiq.core.settings import ledger_url
from dagster_taskiq.load import executions, jobs
from dagster_taskiq.load.faults import FaultLog
from dagster_taskiq.load.runner import LoadRunner, RunLauncher, local_target
from dagster_taskiq.load.scenarios import Fault, FaultKind, Plan, Submission, fanout, fast, slow
from dagster_taskiq.load.sessions import RELAUNCHED, Sessions
from dagster_taskiq.load.verify import Report, verify
from tests.conftest import StackFactory, start_workers

RUN_BOUND = 240.0  # seconds from submission to the end of any run


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """The local target points this process's environment at its stack; undo that."""
    saved = dict(os.environ)
    os.environ["POWERTOOLS_METRICS_DISABLED"] = "true"  # EMF lines are for CloudWatch
    yield
    os.environ.clear()
    os.environ.update(saved)


def fault_plan() -> Plan:
    submissions = []
    for i in range(6):
        job, config = fanout(8, 1.0) if i % 2 == 0 else slow(4.0)
        submissions.append(Submission(at=2.0 * i, job=job, run_config=config))
    submissions.append(Submission(at=6.0, job="retry_job"))
    submissions.append(Submission(at=8.0, job="failing_job"))
    # A step still running when the second kill comes (22 s), however soon the runs above
    # are done: a kill that finds no busy worker does not land (they were all done by 23 s
    # once the workers stopped pinging their connections before every statement).
    job, config = slow(8.0)
    submissions.append(Submission(at=16.0, job=job, run_config=config))
    return Plan(
        scenario="fault-injection",
        duration=40.0,
        submissions=tuple(submissions),
        faults=(
            Fault(8.0, FaultKind.KILL_WORKER),
            Fault(12.0, FaultKind.DUPLICATES, count=5),
            # Once the runs have started: Dagster's own run start does not ride out a
            # restart (its writes are not retried); the load launches such a run again
            # (tested below), but a run whose start event was cut ends as FAILURE.
            Fault(16.0, FaultKind.RESTART_DATABASE, seconds=2.0, once_runs_started=True),
            Fault(22.0, FaultKind.KILL_WORKER),
            Fault(26.0, FaultKind.SQS_OUTAGE, seconds=6.0),
            Fault(34.0, FaultKind.DUPLICATES, count=10),
        ),
        duplicate_copies=2,
        lease_seconds=10,
        parameters={"test": "fault-injection"},
    )


def forge_a_second_execution(database_url: str, load_id: str) -> None:
    """What a broken protocol would leave: one attempt's op body run twice, same token."""
    engine = sa.create_engine(ledger_url(database_url))
    with engine.begin() as conn:
        row = (
            conn.execute(
                sa.select(executions.executions)
                .where(executions.executions.c.phase == executions.START)
                .where(executions.executions.c.fencing_token.is_not(None))
                .order_by(executions.executions.c.id.desc())
                .limit(1)
            )
            .mappings()
            .one()
        )
        conn.execute(
            executions.executions.insert().values(
                {k: v for k, v in row.items() if k not in {"id", "at", "record_id"}}
            )
        )
    engine.dispose()


@pytest.mark.slow  # a long fault run: `make test-slow`
@pytest.mark.timeout(600)
def test_nothing_is_lost_or_completed_twice_under_every_fault(
    tmp_path: Path, restored_environ: None
) -> None:
    plan = fault_plan()
    faults = FaultLog()
    # Its own PostgreSQL (to restart) and SQS emulator, as `dagster-taskiq load` starts.
    with local_target(
        plan, faults, stack_dir=tmp_path / "stack", max_workers=3, concurrency=2
    ) as target:
        runner = LoadRunner(
            plan,
            target,
            faults,
            output_dir=tmp_path / "out",
            drain_timeout=RUN_BOUND,
            stuck_after=RUN_BOUND,
            max_concurrent_runs=8,
        )
        result = runner.run()
        # The command reads the same records, and its exit code tells a problem apart.
        verified = CliRunner().invoke(
            cli,
            ["verify", "--load-id", runner.load_id, "--output", str(tmp_path / "v.csv"),
             "--format", "csv"],
        )  # fmt: skip
        forge_a_second_execution(target.database_url, runner.load_id)
        forged = CliRunner().invoke(cli, ["verify", "--load-id", runner.load_id])
    summary = result.summary()
    print(json.dumps(summary, indent=2))  # the figures, with -s

    kinds = [m.kind for m in faults.marks]
    assert kinds.count("kill_worker") == 2, f"both kills landed on busy workers: {kinds}"
    assert {"restart_database", "sqs_outage", "duplicates"} <= set(kinds)
    assert result.report.problems == []
    assert summary["lost_steps"] == 0
    assert summary["completions_recorded_twice"] == 0
    assert summary["unexplained_duplicate_executions"] == 0
    assert summary["runs_not_finished"] == 0
    assert summary["runs_as_expected"] == summary["runs"] == len(plan.submissions)
    # The relay delivered every message twice: the second copies were suppressed.
    assert summary["duplicates_suppressed"] >= summary["attempts"] // 2
    # Once per attempt, but where a killed worker's step ran again.
    assert (
        summary["executions"]
        == summary["attempts"]
        + summary["reexecuted_after_worker_killed"]
        + summary["reexecuted_after_release"]
    )
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout.splitlines()[-1])["lost_steps"] == 0
    with open(tmp_path / "v.csv") as rows:
        assert len(list(csv.DictReader(rows))) == summary["attempts"]
    assert forged.exit_code == 1
    assert "unexplained_duplicate_execution" in forged.output
    for name in ("report.json", "report.csv", "timeline.csv", "load.png", "summary.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0


class DyingRunWorkers(RunLauncher):
    """Its first ``dying`` run workers exit at once, before their run starts, as one does
    that PostgreSQL cut off while it read its run."""

    def __init__(self, *args: Any, dying: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dying = dying
        self.launched = 0

    def command(self, run: DagsterRun) -> list[str]:
        self.launched += 1
        if self.launched <= self.dying:
            return [sys.executable, "-c", "raise SystemExit(3)"]
        return super().command(run)


def relaunched_run(
    database_url: str, tmp_path: Path, dying: int
) -> tuple[DagsterRunStatus, DyingRunWorkers, Report, str]:
    """One run whose first ``dying`` run workers die, launched to the end and verified:
    its status, the launcher, the report and the run id. Either way two run workers were
    launched again, and each relaunch is written once in the run's event log."""
    instance = DagsterInstance.get()
    sessions = Sessions(database_url)
    load_id = sessions.start("relaunch", {})
    launcher = DyingRunWorkers(instance, load_id, 1, tmp_path / "run-workers", dying=dying)
    job, config = fast(0.1)
    run_id = launcher.submit(Submission(at=0.0, job=job, run_config=config))
    assert launcher.wait(time.monotonic() + 120), "the run workers did not finish"
    run = instance.get_run_by_id(run_id)
    assert run is not None
    assert launcher.relaunched == {run_id: 2}
    relaunches = [e for e in instance.all_logs(run_id) if e.message.startswith(RELAUNCHED)]
    assert len(relaunches) == 2
    session = sessions.get(load_id)
    assert session is not None
    report = verify(instance, database_url, session)
    assert report.summary["run_workers_relaunched"] == 2
    sessions.dispose()
    instance.dispose()
    return run.status, launcher, report, run_id


@pytest.mark.timeout(300)
def test_a_run_whose_run_worker_died_before_it_started_is_launched_again(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    with make_stack(code_locations=(jobs.CODE_LOCATION,)) as stack:
        start_workers(stack, 1)
        status, launcher, report, run_id = relaunched_run(stack.database_url, tmp_path, dying=2)
        assert status is DagsterRunStatus.SUCCESS
        assert launcher.finished == {run_id: 0}
        assert report.problems == []
        assert report.summary["runs_as_expected"] == 1 and report.summary["executions"] == 1
        log = (tmp_path / "run-workers" / f"{run_id}.log").read_text()
        assert "run worker 3 exited with code 0" in log


@pytest.mark.timeout(300)
def test_a_run_that_never_starts_is_failed_after_three_run_workers(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    with make_stack(code_locations=(jobs.CODE_LOCATION,)) as stack:
        status, launcher, report, run_id = relaunched_run(stack.database_url, tmp_path, dying=3)
        assert status is DagsterRunStatus.FAILURE
        assert launcher.finished == {run_id: 3}
        assert report.problems == [
            f"unexpected_run_status: {run_id} (fast_job) ended FAILURE after 3 run workers, "
            "expected SUCCESS"
        ]
