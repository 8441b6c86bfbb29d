"""The local stack: everything the system needs, on loopback, with no AWS and no Docker.

- PostgreSQL: embedded (``pgserver``), unless a URL is given; one database holds the
  Dagster instance storage and the ledger, as in AWS.
- SQS: moto's server in a child process, with the queue and its DLQ (redrive policy).
- A Dagster instance (``DAGSTER_HOME`` with a dagster.yaml for dagster-postgres).
- Worker processes: the real ``dagster-taskiq worker`` command.

The same code paths as in AWS; only the endpoints differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import sqlalchemy as sa

from dagster_taskiq.core.settings import (
    DEFAULT_MAX_RECEIVE_COUNT,
    DEFAULT_MESSAGE_RETENTION,
    ENV_ALERT_TOPIC_ARN,
    ENV_CODE_LOCATIONS,
    ENV_DATABASE_URL,
    ENV_DLQ_URL,
    ENV_ENDPOINT_URL,
    ENV_LOCAL_STACK,
    ENV_PRIORITY_QUEUE_URL,
    ENV_QUEUE_URL,
    ENV_REGION,
    ENV_SCALER_FUNCTION,
    dagster_storage_url,
    ledger_url,
)
from dagster_taskiq.core.sqs import create_queue_with_dlq, sqs_client
from dagster_taskiq.local.autoscale import LOCAL_SCALER_FUNCTION, LocalAutoscaler
from dagster_taskiq.local.component_logs import component_logs, log_dead_letter, log_evaluation
from dagster_taskiq.local.dlq_processor import LocalDeadLetters
from dagster_taskiq.local.endpoints import (
    EMULATOR_CREDENTIALS,
    REGION,
    LambdaEndpoint,
    TaskProtectionAgent,
)

if TYPE_CHECKING:
    from dagster_taskiq.scaling.policy import ScalingConfig

DATABASE_NAME = "dagster_taskiq"
# Under the stack's root, for the operations commands in other processes: the stack's
# environment, and one state file per worker pool.
STACK_ENV_FILE = "stack.env"
POOLS_DIR = "pools"


class EmbeddedPostgres:
    """A PostgreSQL server of the ``pgserver`` package, on a Unix socket in its data dir."""

    def __init__(self, data_dir: Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless.
            warnings.simplefilter("ignore")
            import pgserver

            self._server = pgserver.get_server(data_dir, cleanup_mode="stop")
        self.data_dir = data_dir
        self.url = str(self._server.get_uri())  # libpq-style

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server (fast: open connections are cut), stay down, start it again."""
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined] # made at import

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self._server.system_user)
        time.sleep(down_seconds)
        # Starts it with the same socket, and tracks the new postmaster for the cleanup.
        self._server.ensure_postgres_running()

    def stop(self) -> None:
        self._server.cleanup()


@contextlib.contextmanager
def embedded_postgres_server(data_dir: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(data_dir)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """An embedded PostgreSQL server on a Unix socket. Yields a libpq-style URL."""
    with embedded_postgres_server(data_dir) as server:
        yield server.url


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server if missing; returns its URL (same driver)."""
    engine = sa.create_engine(ledger_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar()
            if not exists:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    parts = server_url.split("?", 1)
    base = parts[0].rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{parts[1]}" if len(parts) > 1 else "")


@contextlib.contextmanager
def sqs_emulator(log_file: IO[Any] | None = None) -> Iterator[str]:
    """moto's server in a child process on a free loopback port. Yields its endpoint URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dagster_taskiq.local.sqs_emulator"],
        stdout=subprocess.PIPE,
        stderr=log_file or subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"The SQS emulator did not start (it said {line!r})")
        endpoint = f"http://127.0.0.1:{line}"
        _wait_http(endpoint)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def write_dagster_yaml(dagster_home: Path, database_url: str) -> None:
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(
        "storage:\n"
        "  postgres:\n"
        f'    postgres_url: "{dagster_storage_url(database_url)}"\n'
        "telemetry:\n"
        "  enabled: false\n"
        "run_monitoring:\n"
        "  enabled: false\n"
    )


def create_alert_topic(sqs_endpoint: str, name: str) -> tuple[str, str]:
    """An SNS topic for alerts, with an SQS queue subscribed to it to read them back."""
    import boto3

    sns = boto3.client("sns", region_name=REGION, endpoint_url=sqs_endpoint)
    sqs = sqs_client(region=REGION, endpoint_url=sqs_endpoint)
    topic_arn = sns.create_topic(Name=f"{name}-alerts")["TopicArn"]
    inbox_url = sqs.create_queue(QueueName=f"{name}-alerts-inbox")["QueueUrl"]
    inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=inbox_arn,
        Attributes={"RawMessageDelivery": "true"},
    )
    return topic_arn, inbox_url


@dataclass
class LocalStack:
    root: Path
    database_url: str
    sqs_endpoint: str
    queue_url: str
    dlq_url: str
    alert_topic_arn: str
    alerts_queue_url: str  # subscribed to the alert topic, so alerts can be read back
    dagster_home: Path
    code_locations: tuple[str, ...]
    protection: TaskProtectionAgent
    lambda_endpoint: LambdaEndpoint
    pools: list[WorkerPool] = field(default_factory=list)
    autoscalers: list[LocalAutoscaler] = field(default_factory=list)
    dead_letter_consumers: list[LocalDeadLetters] = field(default_factory=list)
    scaler_function: str | None = None
    postgres: EmbeddedPostgres | None = None  # when the stack started its own

    def env(self) -> dict[str, str]:
        """Environment for any process on this stack: the executor's run worker, workers."""
        return {
            **EMULATOR_CREDENTIALS,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL_SQS": self.sqs_endpoint,
            "DAGSTER_HOME": str(self.dagster_home),
            ENV_QUEUE_URL: self.queue_url,
            ENV_DLQ_URL: self.dlq_url,
            ENV_LOCAL_STACK: str(self.root),
            ENV_DATABASE_URL: self.database_url,
            ENV_ENDPOINT_URL: self.sqs_endpoint,
            ENV_REGION: REGION,
            ENV_CODE_LOCATIONS: ",".join(self.code_locations),
            ENV_ALERT_TOPIC_ARN: self.alert_topic_arn,
            "AWS_ENDPOINT_URL_SNS": self.sqs_endpoint,
            "AWS_ENDPOINT_URL_LAMBDA": self.lambda_endpoint.url,
            "DAGSTER_TASKIQ_LOG_LEVEL": os.environ.get("DAGSTER_TASKIQ_LOG_LEVEL", "INFO"),
            **({ENV_SCALER_FUNCTION: self.scaler_function} if self.scaler_function else {}),
        }

    def apply_env(self) -> None:
        os.environ.update(self.env())

    def write_env_file(self) -> Path:
        """``stack.env`` under the root: with $DAGSTER_TASKIQ_LOCAL_STACK naming the root,
        ``dagster-taskiq status`` (and runs, dlq, logs) in another shell finds this stack.
        Nothing secret: the emulator takes any credentials, the database is on loopback."""
        path = self.root / STACK_ENV_FILE
        path.write_text("".join(f"{key}={value}\n" for key, value in sorted(self.env().items())))
        return path

    def add_queue(
        self,
        name: str,
        *,
        visibility_timeout: int = 300,
        max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT,
    ) -> tuple[str, str]:
        """Another queue (a ``.fifo`` name makes a FIFO queue) with its own DLQ, for
        routing and priority lanes. Returns (queue_url, dlq_url)."""
        base = self.queue_url.rsplit("/", 1)[-1].removesuffix(".fifo")
        return create_queue_with_dlq(
            sqs_client(region=REGION, endpoint_url=self.sqs_endpoint),
            f"{base}-{name}",
            visibility_timeout=visibility_timeout,
            message_retention=DEFAULT_MESSAGE_RETENTION,
            max_receive_count=max_receive_count,
        )

    def worker_pool(self, **kwargs: Any) -> WorkerPool:
        kwargs.setdefault("protection", self.protection)
        pool = WorkerPool(self, **kwargs)
        self.pools.append(pool)
        return pool

    def autoscale(self, pool: WorkerPool, config: ScalingConfig, **kwargs: Any) -> LocalAutoscaler:
        """Size ``pool`` with the scaling policy; the executor's trigger reaches it too."""
        caller_callback = kwargs.pop("on_evaluation", None)

        def on_evaluation(evaluation: Any, cause: str) -> None:
            log_evaluation(evaluation, cause)  # logs/scaler.log, as the Lambda logs it
            if caller_callback is not None:
                caller_callback(evaluation, cause)

        autoscaler = LocalAutoscaler(self, pool, config, on_evaluation=on_evaluation, **kwargs)
        self.lambda_endpoint.register(LOCAL_SCALER_FUNCTION, autoscaler.invoke)
        self.scaler_function = LOCAL_SCALER_FUNCTION
        self.autoscalers.append(autoscaler)
        self.write_env_file()
        pool.scaler_service = autoscaler.scaler.service.name
        pool.publish()
        return autoscaler.start()

    def process_dead_letters(self, **kwargs: Any) -> LocalDeadLetters:
        """Run the DLQ processor on this stack's dead-letter queue."""
        caller_callback = kwargs.pop("on_result", None)

        def on_result(result: Any) -> None:
            log_dead_letter(result)  # logs/dlq-processor.log
            if caller_callback is not None:
                caller_callback(result)

        consumer = LocalDeadLetters(self, on_result=on_result, **kwargs)
        self.dead_letter_consumers.append(consumer)
        return consumer.start()


@contextlib.contextmanager
def local_stack(
    root: Path | None = None,
    *,
    database_url: str | None = None,
    sqs_endpoint: str | None = None,
    queue_name: str | None = None,
    visibility_timeout: int = 300,
    max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT,
    code_locations: tuple[str, ...] = ("dagster_taskiq.local.demo_job",),
) -> Iterator[LocalStack]:
    """Start what is missing; stop everything it started, in reverse order."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dagster-taskiq-")))
        root.mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        stack.enter_context(component_logs(root / "logs"))
        postgres = None
        if database_url is None:
            postgres = stack.enter_context(embedded_postgres_server(root / "pgdata"))
            database_url = create_database(postgres.url, DATABASE_NAME)
        if sqs_endpoint is None:
            emulator_log = stack.enter_context(open(root / "logs" / "sqs-emulator.log", "w"))
            sqs_endpoint = stack.enter_context(sqs_emulator(emulator_log))
        for name, value in EMULATOR_CREDENTIALS.items():
            os.environ.setdefault(name, value)
        client = sqs_client(region=REGION, endpoint_url=sqs_endpoint)
        queue_url, dlq_url = create_queue_with_dlq(
            client,
            queue_name or f"dagster-taskiq-{uuid.uuid4().hex[:8]}",
            visibility_timeout=visibility_timeout,
            message_retention=DEFAULT_MESSAGE_RETENTION,
            max_receive_count=max_receive_count,
        )
        alert_topic_arn, alerts_queue_url = create_alert_topic(
            sqs_endpoint, queue_url.rsplit("/", 1)[-1].removesuffix(".fifo")
        )
        dagster_home = root / "dagster_home"
        write_dagster_yaml(dagster_home, database_url)
        protection = TaskProtectionAgent()
        stack.callback(protection.close)
        lambda_endpoint = LambdaEndpoint()
        stack.callback(lambda_endpoint.close)
        local = LocalStack(
            root=root,
            database_url=database_url,
            sqs_endpoint=sqs_endpoint,
            queue_url=queue_url,
            dlq_url=dlq_url,
            alert_topic_arn=alert_topic_arn,
            alerts_queue_url=alerts_queue_url,
            dagster_home=dagster_home,
            code_locations=code_locations,
            protection=protection,
            lambda_endpoint=lambda_endpoint,
            postgres=postgres,
        )
        local.write_env_file()
        try:
            yield local
        finally:
            for autoscaler in local.autoscalers:
                autoscaler.stop()
            for consumer in local.dead_letter_consumers:
                consumer.stop()
            for pool in local.pools:
                pool.stop()


@dataclass
class LocalWorker:
    name: str
    process: subprocess.Popen[bytes]


class WorkerPool:
    """Real ``dagster-taskiq worker`` processes on the stack, each logging to a file.

    Sized like an ECS service: ``scale_to`` sets the desired count, a worker that dies is
    replaced, and scale-in stops unprotected (idle) workers first, with SIGTERM so that
    they drain.
    """

    def __init__(
        self,
        stack: LocalStack,
        *,
        name: str = "worker",
        concurrency: int = 1,
        extra_args: tuple[str, ...] = (),
        extra_env: Mapping[str, str] | None = None,
        stop_timeout: float = 30.0,
        protection: TaskProtectionAgent | None = None,
    ) -> None:
        self.stack = stack
        self.name = name  # workers are <name>-1, <name>-2, ...; logs/<name>-1.log
        self.concurrency = concurrency
        self.extra_args = extra_args
        self.extra_env = dict(extra_env or {})
        self.stop_timeout = stop_timeout
        self.protection = protection
        self.workers: list[LocalWorker] = []
        self.retiring: list[LocalWorker] = []
        self.scaler_service: str | None = None  # the name the local scaler records it under
        self._started = 0
        self._lock = threading.RLock()

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [w.process for w in self.workers]

    @property
    def target(self) -> int:
        return len(self.workers)

    @property
    def size(self) -> int:
        """Workers running now, including ones draining after a scale-in."""
        return len([w for w in self.workers + self.retiring if w.process.poll() is None])

    def _start_one(self) -> LocalWorker:
        self._started += 1
        name = f"{self.name}-{self._started}"
        log_path = self.stack.root / "logs" / f"{name}.log"
        env = {**os.environ, **self.stack.env()}
        if self.protection is not None:
            env["ECS_AGENT_URI"] = self.protection.agent_uri(name)
        env.update(self.extra_env)
        command = [
            sys.executable,
            "-m",
            "dagster_taskiq",
            "worker",
            "--concurrency",
            str(self.concurrency),
            "--stop-timeout",
            str(self.stop_timeout),
            *self.extra_args,
        ]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        worker = LocalWorker(name, process)
        self.workers.append(worker)
        self.publish()
        return worker

    def scale_to(self, count: int, *, wait: bool = True) -> None:
        with self._lock:
            self.workers = [w for w in self.workers if w.process.poll() is None]
            while len(self.workers) < count:
                self._start_one()
            while len(self.workers) > count:
                victim = self._choose_victim()
                self.workers.remove(victim)
                victim.process.send_signal(signal.SIGTERM)
                self.retiring.append(victim)
            self.publish()
        if wait:
            self._reap(block=True)

    def replace_dead(self) -> int:
        """Like ECS: a worker that stopped on its own is replaced, keeping the desired count."""
        with self._lock:
            dead = [w for w in self.workers if w.process.poll() is not None]
            for worker in dead:
                self.workers.remove(worker)
                self._start_one()
            if dead:
                self.publish()
        return len(dead)

    def _choose_victim(self) -> LocalWorker:
        # Like ECS with task scale-in protection: a busy worker is the last choice.
        def protected(worker: LocalWorker) -> bool:
            return self.protection is not None and self.protection.is_protected(worker.name)

        idle = [w for w in self.workers if not protected(w)]
        return (idle or self.workers)[-1]

    def _reap(self, *, block: bool) -> None:
        for worker in list(self.retiring):
            if block:
                try:
                    worker.process.wait(self.stop_timeout + 15)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()
            if worker.process.poll() is not None:
                self.retiring.remove(worker)
                self.publish()

    def stop(self) -> None:
        with self._lock:
            for worker in self.workers:
                if worker.process.poll() is None:
                    worker.process.send_signal(signal.SIGTERM)
            self.retiring.extend(self.workers)
            self.workers = []
            self.publish()
        self._reap(block=True)

    def queue_urls(self) -> list[str]:
        """The queues this pool's workers read: their --queue-url and --priority-queue-url
        arguments, else the stack's environment."""
        urls: list[str] = []
        for flag, value in zip(self.extra_args, self.extra_args[1:], strict=False):
            if flag in ("--queue-url", "--priority-queue-url"):
                urls.append(value)
        if urls:
            return urls
        env = {**self.stack.env(), **self.extra_env}
        return [
            url.strip()
            for name in (ENV_QUEUE_URL, ENV_PRIORITY_QUEUE_URL)
            for url in env.get(name, "").split(",")
            if url.strip()
        ]

    def publish(self) -> None:
        """Write the pool's state to ``pools/<name>.json`` under the stack's root, for the
        operations commands, which run in other processes (as ECS's describe_services)."""
        with self._lock:
            state = {
                "name": self.name,
                "queue_urls": self.queue_urls(),
                "desired": self.target,
                "scaler_service": self.scaler_service,
                "workers": [
                    {"name": w.name, "pid": w.process.pid, "log": f"{w.name}.log"}
                    for w in self.workers + self.retiring
                    if w.process.poll() is None
                ],
            }
            directory = self.stack.root / POOLS_DIR
            directory.mkdir(exist_ok=True)
            path = directory / f"{self.name}.json"
            # Replaced whole, so that a reader never sees half a file.
            scratch = path.with_suffix(".json.tmp")
            scratch.write_text(json.dumps(state, indent=2))
            os.replace(scratch, path)

    def logs(self) -> str:
        chunks = []
        for path in sorted((self.stack.root / "logs").glob(f"{self.name}-*.log")):
            chunks.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(chunks)
