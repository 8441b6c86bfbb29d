"""The load simulator: submits a plan's runs, injects its faults, samples the system,
shows progress, and at the end verifies, writes the report and draws the picture.

Each run is executed by a run worker process of its own (``dagster api execute_run``,
as Dagster's run launcher starts) through the taskiq executor, at most
``max_concurrent_runs`` at once (like the QueuedRunCoordinator's limit); the rest wait in
line. A run whose run worker exited before the run started is launched again, as run
monitoring would (``RunLauncher``). Steps go through the real queue to real workers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, reconstructable
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import serialize_value

from dagster_taskiq.core.errors import QueueUnavailable
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.retry import retry_while_unreachable
from dagster_taskiq.core.settings import ENV_DATABASE_URL, ENV_ENDPOINT_URL, ENV_QUEUE_URL
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.load import jobs
from dagster_taskiq.load.executions import ENV_RECORD_URL
from dagster_taskiq.load.faults import (
    DuplicatingRelay,
    FaultLog,
    FaultMark,
    WorkerKiller,
    WorkerNetwork,
)
from dagster_taskiq.load.samples import Sample
from dagster_taskiq.load.scenarios import Fault, FaultKind, Plan, Submission
from dagster_taskiq.load.sessions import LOAD_TAG, RELAUNCHED, Sessions
from dagster_taskiq.load.verify import Report, verify
from dagster_taskiq.local.stack import LocalStack, WorkerPool, local_stack
from dagster_taskiq.scaling.policy import ScalingConfig

SAMPLE_SECONDS = 1.0
RUN_WORKER_LAUNCHES = 3  # per run, for a run whose run workers exit before it starts
DATABASE_PATIENCE_SECONDS = 120.0  # to read or record a run after its run worker exited
NOT_YET_STARTED = frozenset({DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING})
RUNS_START_PATIENCE = 60.0  # seconds a fault waits for runs to start (once_runs_started)

T = TypeVar("T")


@dataclass
class Target:
    """Where the load goes: the queue the executor sends to, the database, and, on the
    local stack, the workers and the means to hurt them."""

    instance: DagsterInstance
    database_url: str
    queue: SqsQueue  # the queue the workers read (depth and in-flight are sampled here)
    executor_config: dict[str, Any] = field(default_factory=dict)
    pool: WorkerPool | None = None
    stack: LocalStack | None = None
    killer: WorkerKiller | None = None
    network: WorkerNetwork | None = None
    relay: DuplicatingRelay | None = None

    def desired_and_running(self) -> tuple[int | None, int | None]:
        if self.pool is None:
            return None, None
        return self.pool.target, self.pool.size


@contextlib.contextmanager
def local_target(
    plan: Plan,
    faults: FaultLog,
    *,
    stack_dir: Path | None,
    max_workers: int,
    concurrency: int,
) -> Iterator[Target]:
    """The local stack, with a worker pool the scaling policy sizes, set up for ``plan``."""
    kinds = {f.kind for f in plan.faults}
    with local_stack(stack_dir, code_locations=(jobs.CODE_LOCATION,)) as stack:
        stack.apply_env()
        executor_config: dict[str, Any] = {"visibility_timeout": plan.lease_seconds}
        worker_env = {ENV_RECORD_URL: stack.database_url}  # the instrument is never cut
        worker_args: tuple[str, ...] = ("--wait-seconds", "2")
        network = relay = None
        with contextlib.ExitStack() as exits:
            if kinds & {FaultKind.PARTITION, FaultKind.SQS_OUTAGE}:
                network = WorkerNetwork(stack, faults)
                exits.callback(network.close)
                worker_env.update(network.worker_env())
                executor_config["endpoint_url"] = network.executor_sqs_endpoint
            workers_queue_url = stack.queue_url
            if plan.duplicate_copies > 1:
                relay = DuplicatingRelay(stack, faults, copies=plan.duplicate_copies).start()
                exits.callback(relay.stop)
                workers_queue_url = relay.workers_queue_url
                worker_args += ("--queue-url", workers_queue_url)
            pool = stack.worker_pool(
                concurrency=concurrency, extra_args=worker_args, extra_env=worker_env
            )
            stack.autoscale(
                pool,
                ScalingConfig(
                    max_workers=max_workers,
                    steps_per_worker=concurrency,
                    scale_in_stabilization_seconds=30,
                ),
                tick_seconds=2,
                queue_url=workers_queue_url,
            )
            stack.process_dead_letters()
            instance = DagsterInstance.get()
            exits.callback(instance.dispose)
            yield Target(
                instance=instance,
                database_url=stack.database_url,
                queue=SqsQueue(workers_queue_url, endpoint_url=stack.sqs_endpoint),
                executor_config=executor_config,
                pool=pool,
                stack=stack,
                killer=WorkerKiller(pool, faults),
                network=network,
                relay=relay,
            )


@contextlib.contextmanager
def configured_target(environ: dict[str, str]) -> Iterator[Target]:
    """Endpoints from the environment (a deployed stack): no local workers to hurt."""
    missing = [n for n in (ENV_QUEUE_URL, ENV_DATABASE_URL, "DAGSTER_HOME") if not environ.get(n)]
    if missing:
        raise ValueError(f"Set {', '.join(missing)} to load configured endpoints.")
    instance = DagsterInstance.get()
    try:
        yield Target(
            instance=instance,
            database_url=environ[ENV_DATABASE_URL],
            queue=SqsQueue(environ[ENV_QUEUE_URL], endpoint_url=environ.get(ENV_ENDPOINT_URL)),
        )
    finally:
        instance.dispose()


class RunLauncher:
    """Each run in a run worker process of its own, as Dagster's DefaultRunLauncher does
    (``dagster api execute_run``), at most ``limit`` at once; the rest wait in line.

    It also watches its run workers, as Dagster's run monitoring would: a run worker that
    exits while its run has not started (it died on the way, say because PostgreSQL was
    restarted while it read the run: dagster-postgres retries the connecting, not a
    statement on a connection the server cut) leaves a run that nobody would ever start.
    Such a run is launched again, at most ``launches`` run workers in all, each time
    written in the run's event log (``RELAUNCHED``, which ``verify`` counts); after that
    the run is marked failed. Only a run that never started is launched again: nothing
    of it has run yet.
    """

    def __init__(
        self,
        instance: DagsterInstance,
        load_id: str,
        limit: int,
        log_dir: Path,
        *,
        executor_config: dict[str, Any] | None = None,
        launches: int = RUN_WORKER_LAUNCHES,
        say: Callable[[str], None] | None = None,
        patience: float = DATABASE_PATIENCE_SECONDS,
    ) -> None:
        self.instance = instance
        self.load_id = load_id
        self.log_dir = log_dir  # one log per run: what each of its run workers printed
        self.executor_config = executor_config or {}
        self.launches = launches
        self.patience = patience
        self._say = say or (lambda text: None)
        self._slots = threading.Semaphore(limit)
        self._lock = threading.Lock()
        self.run_ids: list[str] = []
        self.finished: dict[str, int] = {}  # run id -> the last run worker's exit code
        self.relaunched: dict[str, int] = {}  # run id -> run workers launched again
        self._threads: list[threading.Thread] = []

    def submit(self, submission: Submission) -> str:
        job = jobs.JOBS[submission.job]
        run_config = {
            **submission.run_config,
            "execution": {"config": self.executor_config},
        }
        run = self.instance.create_run_for_job(
            job,
            run_config=run_config,
            tags={LOAD_TAG: self.load_id},
            job_code_origin=reconstructable(job).get_python_origin(),
        )
        with self._lock:
            self.run_ids.append(run.run_id)
        thread = threading.Thread(target=self._execute, args=(run,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return run.run_id

    def command(self, run: DagsterRun) -> list[str]:
        """The run worker's command line."""
        assert run.job_code_origin is not None
        args = ExecuteRunArgs(
            job_origin=run.job_code_origin,
            run_id=run.run_id,
            instance_ref=self.instance.get_ref(),
            set_exit_code_on_failure=True,
        )
        return [sys.executable, "-m", "dagster", "api", "execute_run", serialize_value(args)]

    def _execute(self, run: DagsterRun) -> None:
        with self._slots:
            code = self._launch_until_started(run)
        with self._lock:
            self.finished[run.run_id] = code

    def _launch_until_started(self, run: DagsterRun) -> int:
        """Launch run workers for ``run`` until one gets it started; the last exit code."""
        launch = 0
        while True:
            launch += 1
            code = self._run_worker(run, launch)
            status = self._patiently(
                functools.partial(self._status, run.run_id), f"read run {run.run_id}"
            )
            if not must_launch_again(status, launch, self.launches):
                if status in NOT_YET_STARTED:  # given up: fail it, as run monitoring would
                    self._give_up(run, launch, code)
                elif status is None:
                    self._say(
                        f"run {run.run_id}: its run worker exited with code {code}, and its "
                        f"status could not be read within {self.patience:.0f} s"
                    )
                return code
            why = f"{RELAUNCHED} (run worker {launch} of at most {self.launches}, exit code {code})"
            recorded = self._patiently(
                functools.partial(self.instance.report_engine_event, why, run),
                f"record on run {run.run_id}",
            )
            if recorded is None:
                return code  # not launched again unless it is written down
            with self._lock:
                self.relaunched[run.run_id] = launch
            self._say(f"run {run.run_id} ({run.job_name}): {why}")

    def _run_worker(self, run: DagsterRun, launch: int) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{run.run_id}.log", "ab") as log:
            log.write(f"--- run worker {launch} of run {run.run_id} ({run.job_name})\n".encode())
            log.flush()
            code = subprocess.call(self.command(run), stdout=log, stderr=subprocess.STDOUT)
            log.write(f"--- run worker {launch} exited with code {code}\n".encode())
        return code

    def _status(self, run_id: str) -> DagsterRunStatus:
        run = self.instance.get_run_by_id(run_id)
        assert run is not None, f"run {run_id} is gone"
        return run.status

    def status(self, run_id: str) -> DagsterRunStatus | None:
        """The run's status, or None when it cannot be read now."""
        try:
            return self._status(run_id)
        except Exception:  # dagster-postgres and SQLAlchemy raise many kinds
            return None

    def _give_up(self, run: DagsterRun, launch: int, code: int) -> None:
        why = (
            f"{launch} run workers exited before the run started (the last with code {code}); "
            "not launched again."
        )
        failed = self._patiently(
            functools.partial(self.instance.report_run_failed, run, why), f"fail run {run.run_id}"
        )
        if failed is not None:
            self._say(f"run {run.run_id} ({run.job_name}) marked failed: {why}")

    def _patiently(self, action: Callable[[], T], what: str) -> T | None:
        """``action``, retried while the database is unreachable, for ``patience`` seconds.

        The run worker may have died of the very outage that is still going on.
        """
        try:
            return retry_while_unreachable(
                action,
                time.monotonic() + self.patience,
                # dagster-postgres and SQLAlchemy raise many kinds
                errors=(Exception,),
                what=f"The database (to {what})",
            )
        except Exception as e:
            self._say(f"could not {what}: {e}")
            return None

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self.run_ids) - len(self.finished)

    def wait(self, deadline: float) -> bool:
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return self.in_flight == 0


def must_launch_again(status: DagsterRunStatus | None, launches: int, limit: int) -> bool:
    """After a run worker exited: launch another? Only for a run that has not started (no
    step of it can have run) and only ``limit`` run workers in all."""
    return status in NOT_YET_STARTED and launches < limit


class LoadRunner:
    def __init__(
        self,
        plan: Plan,
        target: Target,
        faults: FaultLog,
        *,
        output_dir: Path,
        max_concurrent_runs: int = 10,
        drain_timeout: float = 300.0,
        stuck_after: float = 600.0,
        progress: TextIO = sys.stderr,
    ) -> None:
        self.plan = plan
        self.target = target
        self.faults = faults
        self.output_dir = output_dir
        self.drain_timeout = drain_timeout
        self.stuck_after = stuck_after
        self.progress = progress
        self.sessions = Sessions(target.database_url)
        self.load_id = self.sessions.start(plan.scenario, plan.parameters)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.launcher = RunLauncher(
            target.instance,
            self.load_id,
            max_concurrent_runs,
            output_dir / "run-workers",
            executor_config=target.executor_config,
            say=self._say,
        )
        self.samples: list[Sample] = []
        self._ledger = Ledger(target.database_url, pool_size=1)
        self._stop = threading.Event()
        self._started = time.time()
        self._started_db = datetime.now(UTC)

    # -- the threads ---------------------------------------------------------------------

    def _sleep_until(self, offset: float) -> bool:
        delay = self._started + offset - time.time()
        return not (delay > 0 and self._stop.wait(delay))

    def _submit_all(self) -> None:
        for submission in sorted(self.plan.submissions, key=lambda s: s.at):
            if not self._sleep_until(submission.at):
                return
            self.launcher.submit(submission)

    def _inject_all(self) -> None:
        for fault in sorted(self.plan.faults, key=lambda f: f.at):
            if not self._sleep_until(fault.at):
                return
            if fault.once_runs_started:
                self._wait_for_runs_to_start(RUNS_START_PATIENCE)
            try:
                self._inject(fault)
            except Exception as e:
                self._say(f"fault {fault.kind.value} could not be injected: {e}")

    def _wait_for_runs_to_start(self, patience: float) -> None:
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline and not self._stop.is_set():
            if not any(
                self.launcher.status(run_id) in NOT_YET_STARTED
                for run_id in list(self.launcher.run_ids)
            ):
                return
            self._stop.wait(0.5)
        self._say("runs still starting; injecting the fault anyway")

    def _inject(self, fault: Fault) -> FaultMark | None:
        target = self.target
        if fault.kind is FaultKind.KILL_WORKER and target.killer is not None:
            return target.killer.kill_busy(fault.count)
        if fault.kind is FaultKind.PARTITION and target.network is not None:
            return target.network.partition(fault.seconds)
        if fault.kind is FaultKind.SQS_OUTAGE and target.network is not None:
            return target.network.sqs_outage(fault.seconds)
        if fault.kind is FaultKind.DUPLICATES and target.relay is not None:
            return target.relay.resend(fault.count)
        if fault.kind is FaultKind.RESTART_DATABASE and target.stack and target.stack.postgres:
            mark = FaultMark(
                time.time(), "restart_database", fault.seconds, detail="PostgreSQL restarted"
            )
            target.stack.postgres.restart(fault.seconds)
            return self.faults.add(mark)
        raise ValueError(f"{fault.kind.value} needs the local stack")

    def sample(self) -> Sample:
        depth = leases = finished = None
        with contextlib.suppress(QueueUnavailable):
            d = self.target.queue.depth()
            depth = (d.visible + d.delayed, d.in_flight)
        with contextlib.suppress(Exception):  # the database may be down on purpose
            leases = self._ledger.live_leases()
            finished = self._ledger.finished_since(self._started_db)
        desired, running = self.target.desired_and_running()
        return Sample(
            at=time.time(),
            queue_visible=depth[0] if depth else None,
            queue_in_flight=depth[1] if depth else None,
            desired_workers=desired,
            running_workers=running,
            live_leases=leases,
            steps_finished=finished,
            runs_submitted=len(self.launcher.run_ids),
            runs_finished=len(self.launcher.finished),
        )

    def _sample_all(self) -> None:
        last_shown = 0.0
        while not self._stop.wait(SAMPLE_SECONDS):
            sample = self.sample()
            self.samples.append(sample)
            if sample.at - last_shown >= 2.0:
                self._show(sample)
                last_shown = sample.at

    def _show(self, s: Sample) -> None:
        codes = list(self.launcher.finished.values())
        line = (
            f"[load {self.plan.scenario}] {s.at - self._started:5.0f}/{self.plan.duration:.0f} s"
            f" | runs {s.runs_submitted}/{len(self.plan.submissions)} submitted,"
            f" {codes.count(0)} ok, {len(codes) - codes.count(0)}"
            f" failed, {self.launcher.in_flight} running"
            f" | queue {_n(s.queue_visible)} waiting, {_n(s.queue_in_flight)} in flight"
            f" | workers {_n(s.running_workers)}/{_n(s.desired_workers)}"
            f" | steps done {_n(s.steps_finished)} | faults {len(self.faults.marks)}"
        )
        if self.progress.isatty():
            self.progress.write("\r\033[K" + line)
        else:
            self.progress.write(line + "\n")
        self.progress.flush()

    def _say(self, text: str) -> None:
        self.progress.write(f"\n[load] {text}\n")
        self.progress.flush()

    # -- the whole load ------------------------------------------------------------------

    def run(self) -> LoadResult:
        self._say(f"{self.plan.scenario}: load id {self.load_id}")
        threads = [
            threading.Thread(target=self._submit_all, name="submit", daemon=True),
            threading.Thread(target=self._inject_all, name="faults", daemon=True),
            threading.Thread(target=self._sample_all, name="sample", daemon=True),
        ]
        for thread in threads:
            thread.start()
        threads[0].join()
        self._sleep_until(self.plan.duration)
        finished = self.launcher.wait(time.monotonic() + self.drain_timeout)
        self._say(
            "all runs finished"
            if finished
            else f"{self.launcher.in_flight} runs still running after {self.drain_timeout:.0f} s"
        )
        if finished:
            self._settle(2 * self.plan.lease_seconds + 30)
        self._stop.set()
        for thread in threads:
            thread.join(30)
        self.sessions.finish(self.load_id, self.faults.marks)
        session = self.sessions.get(self.load_id)
        assert session is not None
        report = verify(
            self.target.instance,
            self.target.database_url,
            session,
            stuck_after=self.stuck_after,
        )
        result = LoadResult(self, report, wall_seconds=round(time.time() - self._started, 1))
        result.write(self.output_dir)
        self._ledger.dispose()
        self.sessions.dispose()
        return result

    def _settle(self, patience: float) -> None:
        """Wait for the queue to empty: a duplicate copy that met its step still running
        was hidden until the lease would end, and is counted as suppressed only once a
        worker has received it again."""
        deadline = time.monotonic() + patience
        left: int | None = None
        while time.monotonic() < deadline:
            with contextlib.suppress(QueueUnavailable):
                depth = self.target.queue.depth()
                left = depth.visible + depth.delayed + depth.in_flight
                if left == 0:
                    return
            time.sleep(1.0)
        self._say(f"the queue still holds {_n(left)} messages after {patience:.0f} s")


def _n(value: int | None) -> str:
    return "?" if value is None else str(value)


@dataclass
class LoadResult:
    runner: LoadRunner
    report: Report
    wall_seconds: float  # taken once, so summary.json and the printed summary agree

    def summary(self) -> dict[str, Any]:
        runner = self.runner
        samples = runner.samples
        return {
            "load_id": runner.load_id,
            "scenario": runner.plan.scenario,
            "parameters": runner.plan.parameters,
            "wall_seconds": self.wall_seconds,
            "faults": {
                kind: sum(1 for m in runner.faults.marks if m.kind == kind)
                for kind in sorted({m.kind for m in runner.faults.marks})
            },
            "workers_killed": len(runner.faults.killed_pids),
            "max_workers": max((s.desired_workers or 0 for s in samples), default=0),
            "max_queue_depth": max((s.queue_visible or 0 for s in samples), default=0),
            **self.report.summary,
            "problems": self.report.problems,
        }

    def write(self, output_dir: Path) -> None:
        from dagster_taskiq.load.plot import draw

        output_dir.mkdir(parents=True, exist_ok=True)
        self.report.write(output_dir / "report.json", "json")
        self.report.write(output_dir / "report.csv", "csv")
        (output_dir / "faults.json").write_text(
            json.dumps([asdict(m) for m in self.runner.faults.marks], indent=2)
        )
        with open(output_dir / "timeline.csv", "w") as out:
            names = list(Sample.__dataclass_fields__)
            out.write(",".join(names) + "\n")
            for sample in self.runner.samples:
                values = asdict(sample)
                out.write(",".join("" if values[n] is None else str(values[n]) for n in names))
                out.write("\n")
        draw(
            self.runner.samples,
            self.runner.faults.marks,
            output_dir / "load.png",
            title=f"{self.runner.plan.scenario} ({self.runner.load_id})",
        )
        (output_dir / "summary.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
