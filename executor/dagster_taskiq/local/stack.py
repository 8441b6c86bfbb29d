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
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from dagster_taskiq.queue import create_queue_with_dlq, sqs_client
from dagster_taskiq.settings import (
    DEFAULT_MAX_RECEIVE_COUNT,
    DEFAULT_MESSAGE_RETENTION,
    ENV_CODE_LOCATIONS,
    ENV_DATABASE_URL,
    ENV_ENDPOINT_URL,
    ENV_QUEUE_URL,
    ENV_REGION,
    dagster_storage_url,
    ledger_url,
)

REGION = "us-east-1"
# moto accepts any credentials; these are not secrets.
EMULATOR_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}
DATABASE_NAME = "dagster_taskiq"


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """An embedded PostgreSQL server on a Unix socket. Yields a libpq-style URL."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(data_dir, cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


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


@dataclass
class LocalStack:
    root: Path
    database_url: str
    sqs_endpoint: str
    queue_url: str
    dlq_url: str
    dagster_home: Path
    code_locations: tuple[str, ...]
    pools: list[WorkerPool] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """Environment for any process on this stack: the executor's run worker, workers."""
        return {
            **EMULATOR_CREDENTIALS,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL_SQS": self.sqs_endpoint,
            "DAGSTER_HOME": str(self.dagster_home),
            ENV_QUEUE_URL: self.queue_url,
            ENV_DATABASE_URL: self.database_url,
            ENV_ENDPOINT_URL: self.sqs_endpoint,
            ENV_REGION: REGION,
            ENV_CODE_LOCATIONS: ",".join(self.code_locations),
            "DAGSTER_TASKIQ_LOG_LEVEL": os.environ.get("DAGSTER_TASKIQ_LOG_LEVEL", "INFO"),
        }

    def apply_env(self) -> None:
        os.environ.update(self.env())

    def worker_pool(self, **kwargs: Any) -> WorkerPool:
        pool = WorkerPool(self, **kwargs)
        self.pools.append(pool)
        return pool


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
        if database_url is None:
            server_url = stack.enter_context(embedded_postgres(root / "pgdata"))
            database_url = create_database(server_url, DATABASE_NAME)
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
        dagster_home = root / "dagster_home"
        write_dagster_yaml(dagster_home, database_url)
        local = LocalStack(
            root=root,
            database_url=database_url,
            sqs_endpoint=sqs_endpoint,
            queue_url=queue_url,
            dlq_url=dlq_url,
            dagster_home=dagster_home,
            code_locations=code_locations,
        )
        try:
            yield local
        finally:
            for pool in local.pools:
                pool.stop()


class WorkerPool:
    """Real ``dagster-taskiq worker`` processes on the stack, each logging to a file."""

    def __init__(
        self,
        stack: LocalStack,
        *,
        concurrency: int = 1,
        extra_args: tuple[str, ...] = (),
        extra_env: Mapping[str, str] | None = None,
        stop_timeout: float = 30.0,
    ) -> None:
        self.stack = stack
        self.concurrency = concurrency
        self.extra_args = extra_args
        self.extra_env = dict(extra_env or {})
        self.stop_timeout = stop_timeout
        self.processes: list[subprocess.Popen[bytes]] = []
        self._started = 0

    @property
    def size(self) -> int:
        return len([p for p in self.processes if p.poll() is None])

    def start_one(self) -> subprocess.Popen[bytes]:
        self._started += 1
        log_path = self.stack.root / "logs" / f"worker-{self._started}.log"
        env = {**os.environ, **self.stack.env(), **self.extra_env}
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
        self.processes.append(process)
        return process

    def scale_to(self, count: int) -> None:
        self.processes = [p for p in self.processes if p.poll() is None]
        while len(self.processes) < count:
            self.start_one()
        while len(self.processes) > count:
            self._terminate(self.processes.pop())

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.stop_timeout + 15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            self._terminate(process)
        self.processes = []

    def logs(self) -> str:
        chunks = []
        for path in sorted((self.stack.root / "logs").glob("worker-*.log")):
            chunks.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(chunks)
