"""The operations commands on the local stack, with a real run in every state.

One stack for the module, set up once: a run that retried and succeeded, one whose step
kills its worker every time (dead-lettered), one whose message is signed with the wrong key
(rejected), one whose steps hold every slot (running), and one waiting behind it (queued).
The DLQ processor is down at first, so the dead letters stay in the DLQ for ``dlq``; a
test starts it later and finds what it recorded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from dagster import DagsterInstance, execute_job, reconstructable
from rich.console import Console
from rich.text import Text

from dagster_taskiq.cli import cli
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.settings import ENV_LOCAL_STACK, ENV_SIGNING_KEY
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.local.stack import LocalStack, WorkerPool, local_stack
from dagster_taskiq.operations.logs import LogQuery, follow_logs, parse_since
from dagster_taskiq.operations.render import watch
from dagster_taskiq.operations.target import resolve_target
from dagster_taskiq.scaling.policy import ScalingConfig
from tests import jobs
from tests.conftest import REPO_ROOT, TEST_CODE_LOCATION, new_database
from tests.helpers import AS_A_PIPE, RunProcess, wait_for

SIGNING_KEY = "operations-test-key"
MAX_RECEIVE_COUNT = 2


def execution(**config: Any) -> dict[str, Any]:
    return {
        "execution": {
            "config": {"max_receive_count": MAX_RECEIVE_COUNT, "health_check_interval": 1, **config}
        }
    }


@dataclass
class Scenario:
    stack: LocalStack
    pool: WorkerPool
    ledger: Ledger
    retried: str
    dead_lettered: RunProcess
    rejected: RunProcess
    running: RunProcess
    queued: RunProcess

    def dlq_depth(self) -> int:
        return SqsQueue(self.stack.dlq_url, endpoint_url=self.stack.sqs_endpoint).depth().visible

    def statuses(self, run_id: str) -> list[str]:
        return sorted(r.status.value for r in self.ledger.for_run(run_id))


@pytest.fixture(scope="module")
def scenario(
    postgres_url: str, sqs_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("operations") / uuid.uuid4().hex[:6]
    with (
        # Its own database: status counts every rejection and row in the ledger, and the
        # session's database holds other tests' (their forged messages, say).
        new_database(postgres_url, "operations") as database_url,
        pytest.MonkeyPatch.context() as env,
        local_stack(
            root,
            database_url=database_url,
            sqs_endpoint=sqs_endpoint,
            code_locations=(TEST_CODE_LOCATION,),
            max_receive_count=MAX_RECEIVE_COUNT,
        ) as stack,
    ):
        for key, value in stack.env().items():
            env.setenv(key, value)
        env.setenv("PYTHONPATH", str(REPO_ROOT))
        env.setenv(ENV_SIGNING_KEY, SIGNING_KEY)  # the workers' and the executor's
        env.setenv("POWERTOOLS_METRICS_DISABLED", "true")
        ledger = Ledger(database_url)  # read only; the runs create its tables
        # One worker with two step processes, kept at one by the scaling policy (which
        # gives the scaler a log and a last decision).
        pool = stack.worker_pool(concurrency=2, extra_args=("--wait-seconds", "1"), stop_timeout=3)
        stack.autoscale(
            pool, ScalingConfig(min_workers=1, max_workers=1, steps_per_worker=2), tick_seconds=1
        )
        wait_for(lambda: pool.size == 1, timeout=30, what="the scaler to start a worker")
        instance = DagsterInstance.get()
        processes: list[RunProcess] = []
        try:
            # The runs that need no slot for long first, in parallel with the retried run.
            killer = RunProcess("killer_job", execution(visibility_timeout=4))
            processes.append(killer)
            forged = RunProcess("outputs_job", execution(signing_key="not-the-workers-key"))
            processes.append(forged)
            retried = execute_job(
                reconstructable(jobs.retry_job), instance=instance, run_config=execution()
            )
            assert retried.success
            scene = Scenario(stack, pool, ledger, retried.run_id, killer, forged, killer, killer)
            wait_for(lambda: scene.dlq_depth() == 2, timeout=60, what="two dead letters")
            slow = {f"slow_{i}": {"config": {"seconds": 120.0}} for i in range(4)}
            scene.running = RunProcess("slow_fanout_job", {"ops": slow, **execution()})
            processes.append(scene.running)
            wait_for(
                lambda: len(scene.statuses(scene.running.run_id)) == 4,
                timeout=60,
                what="the fan-out's steps launched",
            )
            # Its step is launched seconds later, when both slots are taken.
            scene.queued = RunProcess("slow_job", {"ops": {"slow": {"config": {"seconds": 1.0}}}})
            processes.append(scene.queued)
            wait_for(
                lambda: (
                    scene.statuses(scene.running.run_id).count("RUNNING") == 2
                    and scene.statuses(scene.queued.run_id) == ["ENQUEUED"]
                ),
                timeout=60,
                what="two steps running and one queued behind them",
            )
            yield scene
        finally:
            for process in processes:
                if process.process.poll() is None:
                    process.interrupt()
            for process in processes:
                try:
                    process.wait(60)
                except Exception:
                    process.process.kill()
            instance.dispose()
            ledger.dispose()


def invoke(*args: str, input: str | None = None) -> Result:
    result = CliRunner(env=AS_A_PIPE).invoke(cli, list(args), input=input, catch_exceptions=False)
    return result


def ok(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


# -- status --------------------------------------------------------------------------------


def test_status_shows_queues_workers_ledger_rejections_and_runs_in_flight(
    scenario: Scenario,
) -> None:
    report = json.loads(ok("status", "--json"))

    assert report["kind"] == "local" and report["errors"] == []
    (pool,) = report["pools"]
    assert pool["name"] == "worker"
    assert pool["workers"]["desired"] == 1 and pool["workers"]["running"] == 1
    assert pool["workers"]["last_decision"] is not None, "the local scaler decided"
    queue, dlq = pool["queues"]
    assert (queue["role"], queue["url"]) == ("queue", scenario.stack.queue_url)
    assert queue["dlq_url"] == scenario.stack.dlq_url
    # Two steps of the fan-out and the queued run's wait; two run.
    assert queue["visible"] >= 3 and queue["in_flight"] >= 2
    assert queue["live_leases"] == 2
    assert queue["oldest_age_source"] == "ledger" and queue["oldest_age_seconds"] > 0
    assert (dlq["role"], dlq["url"], dlq["visible"]) == ("dlq", scenario.stack.dlq_url, 2)
    assert report["dlq_depth"] == 2
    assert report["live_leases"] >= 2
    assert report["ledger"]["RUNNING"] >= 2 and report["ledger"]["ENQUEUED"] >= 3
    reasons = {r["reason"]: r for r in report["rejected_last_hour"]}
    assert reasons["forged"]["receives"] >= MAX_RECEIVE_COUNT
    in_flight = {run["run_id"]: run for run in report["runs_in_flight"]}
    assert in_flight[scenario.running.run_id]["attempts"] == {"ENQUEUED": 2, "RUNNING": 2}
    assert in_flight[scenario.running.run_id]["live_leases"] == 2
    assert in_flight[scenario.queued.run_id]["attempts"] == {"ENQUEUED": 1}
    # The executor fails a step whose message used its delivery budget on rejections.
    if scenario.rejected.run_id in in_flight:
        assert in_flight[scenario.rejected.run_id]["attempts"] == {"ENQUEUED": 1}
    assert scenario.retried not in in_flight, "every attempt of it has ended"

    table = ok("status")
    assert "Pool worker" in table and "desired 1, running 1 [worker-1]" in table
    assert scenario.stack.dlq_url.rsplit("/", 1)[-1] in table
    assert "(ledger)" in table and "last scaling decision" in table
    assert "forged 1" in table
    for run in (scenario.running, scenario.queued):
        assert run.run_id in table


def test_status_watch_refreshes_as_text_json_lines_and_a_live_view(scenario: Scenario) -> None:
    text = ok("status", "--watch", "--count", "2", "--interval", "0.2")
    assert text.count("dagster-taskiq status") == 2

    lines = ok("status", "--watch", "--json", "--count", "2", "--interval", "0.2").splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["kind"] == "local" for line in lines)

    # A terminal gets a live view redrawn in place.
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160)
    calls = []

    def produce() -> Text:
        calls.append(1)
        return Text(f"refresh {len(calls)}")

    assert watch(console, produce, interval=0.1, count=3) == 3
    assert len(calls) == 3
    assert "refresh 3" in screen.getvalue()


# -- runs show -----------------------------------------------------------------------------


def attempts(run_id: str, *extra: str) -> list[dict[str, Any]]:
    report = json.loads(ok("runs", "show", run_id, "--json", *extra))
    assert report["run_id"] == run_id
    return list(report["attempts"])


def test_runs_show_a_retried_run_attempt_by_attempt_beside_its_event_log(
    scenario: Scenario,
) -> None:
    first, second = attempts(scenario.retried)
    assert (first["step_key"], first["attempt"], first["ledger_status"]) == (
        "fails_once",
        0,
        "FAILED",
    )
    assert (second["attempt"], second["ledger_status"]) == (1, "SUCCEEDED")
    assert first["fencing_token"] == 1 and first["deliveries"] == 1
    assert first["worker_id"] and first["duplicates_suppressed"] == 0
    assert first["event_log"]["outcome"] == "up for retry"
    assert "first attempt fails on purpose" in first["event_log"]["error"]
    assert second["event_log"]["outcome"] == "succeeded"

    table = ok("runs", "show", scenario.retried)
    assert "Dagster: SUCCESS" in table
    assert "up for retry" in table and "succeeded" in table


def test_runs_show_running_queued_rejected_and_dead_lettered_runs(scenario: Scenario) -> None:
    running = attempts(scenario.running.run_id)
    live = [a for a in running if a["ledger_status"] == "RUNNING"]
    assert len(live) == 2 and all(a["lease"].startswith("live") for a in live)
    assert all("started" in a["event_log"]["events"] for a in live)
    waiting = [a for a in running if a["ledger_status"] == "ENQUEUED"]
    assert len(waiting) == 2 and all(a["event_log"]["outcome"] == "queued" for a in waiting)

    (queued,) = attempts(scenario.queued.run_id)
    assert queued["ledger_status"] == "ENQUEUED" and queued["deliveries"] == 0

    (rejected,) = attempts(scenario.rejected.run_id)
    # Never run; the executor may already have failed it (its budget went on rejections).
    assert rejected["ledger_status"] not in ("RUNNING", "SUCCEEDED")
    assert rejected["deliveries"] == 0
    assert rejected["rejections"] and rejected["rejections"][0]["reason"] == "forged"
    assert rejected["rejections"][0]["receive_count"] == MAX_RECEIVE_COUNT

    (killed,) = attempts(scenario.dead_lettered.run_id)
    assert killed["deliveries"] == MAX_RECEIVE_COUNT
    assert killed["fencing_token"] == MAX_RECEIVE_COUNT
    assert killed["ledger_status"] in ("RUNNING", "DEAD_LETTERED")

    table = ok("runs", "show", scenario.rejected.run_id)
    assert "; rejected: forged" in table

    watched = ok(
        "runs", "show", scenario.queued.run_id, "--watch", "--count", "2", "--interval", "0.2"
    )
    assert watched.count(f"Run {scenario.queued.run_id}") == 2


def test_runs_show_without_the_dagster_instance_shows_the_ledger(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not through the local stack's file, which names DAGSTER_HOME: the environment only.
    monkeypatch.delenv(ENV_LOCAL_STACK)
    monkeypatch.delenv("DAGSTER_HOME")
    report = json.loads(ok("runs", "show", scenario.retried, "--json"))
    assert "DAGSTER_HOME" in report["event_log_unavailable"]
    assert [a["ledger_status"] for a in report["attempts"]] == ["FAILED", "SUCCEEDED"]
    assert all(a["event_log"] is None for a in report["attempts"])
    table = ok("runs", "show", scenario.retried)
    assert "unavailable" in table and "SUCCEEDED" in table


# -- dlq -----------------------------------------------------------------------------------


def letters() -> dict[str | None, dict[str, Any]]:
    listed = json.loads(ok("dlq", "list", "--json", "--hold", "5"))
    return {letter["run_id"]: letter for letter in listed["in_queue"]}


def test_dlq_list_decodes_each_letter_joins_the_ledger_and_gives_them_back(
    scenario: Scenario,
) -> None:
    found = letters()

    killed = found[scenario.dead_lettered.run_id]
    assert killed["key_verified"] and killed["step_key"] == "kills_its_worker"
    assert killed["ledger_deliveries"] == MAX_RECEIVE_COUNT
    assert killed["ledger_status"] in ("RUNNING", "DEAD_LETTERED")
    forged = found[scenario.rejected.run_id]
    assert not forged["key_verified"] and forged["undecodable"].startswith("forged")
    assert forged["idempotency_key"] == f"{scenario.rejected.run_id}:emit:0"
    assert forged["ledger_status"] not in ("RUNNING", "SUCCEEDED")
    assert forged["reason"].startswith("rejected, never executed (forged")
    # Listing consumed nothing: both are visible again at once.
    assert scenario.dlq_depth() == 2

    table = ok("dlq", "list")
    assert "In the dead-letter queue(s): 2" in table
    assert "gave them back at once" in table
    assert scenario.rejected.run_id in table and "kills_its_worker" in table

    only = json.loads(ok("dlq", "list", "--json", "--run", scenario.rejected.run_id))
    assert [x["run_id"] for x in only["in_queue"]] == [scenario.rejected.run_id]


def test_dlq_show_one_letter_in_full(scenario: Scenario) -> None:
    forged = letters()[scenario.rejected.run_id]
    shown = json.loads(ok("dlq", "show", forged["message_id"], "--json"))
    assert shown["message_id"] == forged["message_id"]
    assert '"step_key": "emit"' in shown["body_excerpt"]
    assert "characters>" in shown["body_excerpt"], "the step arguments are left out"
    text = ok("dlq", "show", forged["message_id"])
    assert "undecodable" in text and "forged" in text

    missing = invoke("dlq", "show", "no-such-message")
    assert missing.exit_code == 1 and "No dead letter no-such-message" in missing.output
    assert scenario.dlq_depth() == 2


def test_dlq_purge_asks_and_deletes_only_what_it_listed(scenario: Scenario) -> None:
    forged = letters()[scenario.rejected.run_id]

    declined = invoke("dlq", "purge", "--hold", "30", input="n\n")
    assert declined.exit_code == 1 and "Nothing deleted" in declined.output
    assert scenario.dlq_depth() == 2

    purged = invoke("dlq", "purge", "--message-id", forged["message_id"], "--yes", "--hold", "30")
    assert purged.exit_code == 0, purged.output
    assert "Deleted 1 dead letter(s)" in purged.output
    assert scenario.dlq_depth() == 1
    assert list(letters()) == [scenario.dead_lettered.run_id]


def test_the_dlq_processor_records_what_it_consumed(scenario: Scenario) -> None:
    consumer = scenario.stack.process_dead_letters()
    wait_for(lambda: consumer.results, timeout=30, what="the dead letter to be processed")
    code, err = scenario.dead_lettered.wait(60)
    assert code == 1, err[-2000:]

    listed = json.loads(ok("dlq", "list", "--json", "--hold", "5"))
    assert listed["in_queue"] == []
    recorded = {r["run_id"]: r for r in listed["recorded"]}
    killed = recorded[scenario.dead_lettered.run_id]
    assert killed["ledger_status"] == "DEAD_LETTERED" and "deliveries" in killed["reason"]

    (attempt,) = attempts(scenario.dead_lettered.run_id)
    assert attempt["ledger_status"] == "DEAD_LETTERED"
    assert attempt["event_log"]["outcome"] == "failed"

    lines = ok("logs", "dlq-processor", "--run", scenario.dead_lettered.run_id).splitlines()
    assert lines and all(scenario.dead_lettered.run_id in line for line in lines)
    assert any("dlq-processor.log" in line for line in lines)


# -- logs ----------------------------------------------------------------------------------


def test_logs_of_the_workers_and_the_scaler_filtered_to_a_run(scenario: Scenario) -> None:
    lines = ok("logs", "worker", "--run", scenario.retried).splitlines()
    assert any("Step started" in line for line in lines)
    assert all(scenario.retried in line for line in lines)
    assert all(" worker-1.log " in line for line in lines)

    events = [json.loads(line) for line in ok("logs", "worker", "--json").splitlines()]
    assert {e["source"] for e in events} == {"worker-1.log"}
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)

    scaler = ok("logs", "scaler", "--since", "1h").splitlines()
    assert scaler and all('"reason"' in line for line in scaler if " scaler.log {" in line)
    assert ok("logs", "scaler", "--since", "2000-01-01T00:00:00") != ""
    assert ok("logs", "scaler", "--run", "no-such-run") == ""

    bad = invoke("logs", "worker", "--since", "yesterday")
    assert bad.exit_code == 2 and "neither a duration" in bad.output


def test_logs_follow_prints_new_lines_as_they_come(scenario: Scenario) -> None:
    target = resolve_target()
    marker = f"follow-marker-{uuid.uuid4().hex[:6]}"
    query = LogQuery(component="scaler", since=parse_since("10m"), run_id=marker)
    seen: list[str] = []
    threading.Timer(
        0.5, lambda: logging.getLogger("dagster_taskiq.local.autoscale").info(marker)
    ).start()
    deadline = time.monotonic() + 20
    for event in follow_logs(
        target, query, stop=lambda: bool(seen) or time.monotonic() > deadline, poll_seconds=0.2
    ):
        seen.append(event.message)
    assert len(seen) == 1 and marker in seen[0]


def test_the_stack_names_itself_for_another_shell(scenario: Scenario) -> None:
    root = scenario.stack.root
    env_file = (root / "stack.env").read_text()
    assert f"DAGSTER_TASKIQ_DLQ_URL={scenario.stack.dlq_url}" in env_file
    target = resolve_target({ENV_LOCAL_STACK: str(root)})
    assert target.kind == "local" and target.database_url == scenario.stack.database_url
    assert [p.name for p in target.pools] == ["worker"]
    (state,) = target.local_pools()
    assert state.running == 1 and state.workers[0].name == "worker-1"
    assert Path(root / "logs" / "scaler.log").is_file()

    # Another shell, with nothing but the stack's directory set (no AWS credentials).
    shell = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/"),
        ENV_LOCAL_STACK: str(root),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "dagster_taskiq", "status", "--json"],
        env=shell,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["errors"] == [] and report["pools"][0]["queues"][0]["visible"] is not None
