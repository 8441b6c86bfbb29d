"""Every fault at once, on the real stack, for a bounded couple of minutes.

Several runs of many steps; meanwhile workers are SIGKILLed in the middle of steps, every
message is delivered twice and delivered ones are sent again, PostgreSQL is restarted
once, and SQS is unreachable for a while for workers and executor alike. Then ``verify``
must find nothing lost, nothing completed twice, every op body run once per attempt
except where its worker died mid-step, and every run finished within the bound.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_taskiq.load.faults import FaultLog
from dagster_taskiq.load.runner import LoadRunner, local_target
from dagster_taskiq.load.scenarios import Fault, FaultKind, Plan, Submission, fanout, slow

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
    return Plan(
        scenario="fault-injection",
        duration=40.0,
        submissions=tuple(submissions),
        faults=(
            Fault(8.0, FaultKind.KILL_WORKER),
            Fault(12.0, FaultKind.DUPLICATES, count=5),
            Fault(16.0, FaultKind.RESTART_DATABASE, seconds=2.0),
            Fault(22.0, FaultKind.KILL_WORKER),
            Fault(26.0, FaultKind.SQS_OUTAGE, seconds=6.0),
            Fault(34.0, FaultKind.DUPLICATES, count=10),
        ),
        duplicate_copies=2,
        lease_seconds=10,
        parameters={"test": "fault-injection"},
    )


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
        + summary["reexecuted_after_lease_lost"]
    )
    for name in ("report.json", "report.csv", "timeline.csv", "load.png", "summary.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
