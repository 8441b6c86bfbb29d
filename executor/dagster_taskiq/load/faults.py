"""Fault injectors for the local stack: each does one real thing to real processes.

- ``WorkerKiller``: SIGKILL to workers that are in the middle of a step (the ones holding
  ECS task protection), as when a Fargate task is lost: the supervisor and its step
  processes all at once (``kill_whole_worker``), so nothing of the worker is left to
  give its step back.
- ``WorkerNetwork``: the workers reach SQS and PostgreSQL through loopback TCP proxies
  that can cut every connection and refuse new ones: a network partition.
- ``DuplicatingRelay``: moves each message from the queue the executor sends to, to the
  queue the workers read, several times, and can send delivered messages again later:
  SQS's at-least-once delivery, made frequent.
- ``restart_postgres`` (in ``local.stack``) and ``WorkerNetwork.cut`` on the SQS side
  serve the database restart and the SQS outage.

Every fault is written down as a ``FaultMark``, for the picture and for ``verify``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from dagster_taskiq.core.errors import QueueUnavailable
from dagster_taskiq.core.settings import ENV_DATABASE_URL, ENV_ENDPOINT_URL
from dagster_taskiq.core.sqs import SqsQueue, create_queue_with_dlq, sqs_client
from dagster_taskiq.local.stack import LocalStack, WorkerPool, write_dagster_yaml
from dagster_taskiq.local.tcp_proxy import TcpProxy, postgres_target


@dataclass(frozen=True)
class FaultMark:
    at: float  # time.time() when it began
    kind: str
    seconds: float = 0.0
    detail: str = ""
    pids: tuple[int, ...] = ()  # workers killed


def killed_pids(marks: Iterable[FaultMark]) -> set[int]:
    """The workers these faults killed: a step they were running may have run again."""
    return {pid for mark in marks for pid in mark.pids}


@dataclass
class FaultLog:
    marks: list[FaultMark] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, mark: FaultMark) -> FaultMark:
        with self._lock:
            self.marks.append(mark)
        return mark

    @property
    def killed_pids(self) -> set[int]:
        return killed_pids(self.marks)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, read from /proc (Linux); ``[pid]`` elsewhere."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [pid]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def kill_whole_worker(pid: int) -> list[int]:
    """SIGKILL a worker's supervisor and every process under it in one sweep, as a lost
    Fargate task dies: no part of it lives on to release a lease or give a message back.
    Returns the pids signalled."""
    tree = process_tree(pid)
    # Stop them all first, so that none reacts to another's death, then kill.
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGSTOP)
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    return tree


class WorkerKiller:
    def __init__(self, pool: WorkerPool, log: FaultLog, *, seed: int = 0) -> None:
        self.pool = pool
        self.log = log
        self._rng = random.Random(seed)

    def busy_pids(self) -> list[int]:
        protection = self.pool.protection
        return [
            w.process.pid
            for w in list(self.pool.workers)
            if w.process.poll() is None
            and protection is not None
            and protection.is_protected(w.name)
        ]

    def kill_busy(self, count: int = 1, *, wait: float = 15.0) -> FaultMark | None:
        """SIGKILL up to ``count`` workers that are running a step; waits for one to be."""
        deadline = time.monotonic() + wait
        while not (busy := self.busy_pids()):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)
        victims = self._rng.sample(busy, min(count, len(busy)))
        for pid in victims:
            kill_whole_worker(pid)
        for worker in list(self.pool.workers):
            if worker.process.pid in victims:
                worker.process.wait(10)  # dead before the next kill chooses its victim
        return self.log.add(
            FaultMark(
                time.time(), "kill_worker", detail=f"SIGKILL pid {victims}", pids=tuple(victims)
            )
        )


def via_proxy(database_url: str, proxy: TcpProxy) -> str:
    """The same database URL, reached over TCP through ``proxy``."""
    parts = urlsplit(database_url)
    query = {k: v for k, v in parse_qs(parts.query).items() if k != "host"}
    user = f"{parts.username}{':' + parts.password if parts.password else ''}@"
    netloc = f"{user if parts.username else ''}127.0.0.1:{proxy.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, doseq=True), ""))


class WorkerNetwork:
    """The workers' only way to SQS and PostgreSQL, which a partition can cut; and the
    executor's way to SQS, which an SQS outage cuts as well."""

    def __init__(self, stack: LocalStack, log: FaultLog) -> None:
        self.log = log
        self.postgres = TcpProxy(postgres_target(stack.database_url))
        sqs = urlsplit(stack.sqs_endpoint)
        self.sqs = TcpProxy((sqs.hostname or "127.0.0.1", sqs.port or 80))
        self.database_url = via_proxy(stack.database_url, self.postgres)
        self.sqs_endpoint = f"http://127.0.0.1:{self.sqs.port}"
        self.executor_sqs = TcpProxy((sqs.hostname or "127.0.0.1", sqs.port or 80))
        self.executor_sqs_endpoint = f"http://127.0.0.1:{self.executor_sqs.port}"
        # The workers' own Dagster instance, on the proxied database.
        self.dagster_home = stack.root / "worker_dagster_home"
        write_dagster_yaml(self.dagster_home, self.database_url)
        self._timer: threading.Timer | None = None

    def worker_env(self) -> dict[str, str]:
        return {
            ENV_DATABASE_URL: self.database_url,
            ENV_ENDPOINT_URL: self.sqs_endpoint,
            "AWS_ENDPOINT_URL_SQS": self.sqs_endpoint,
            "DAGSTER_HOME": str(self.dagster_home),
        }

    def partition(self, seconds: float) -> FaultMark:
        """Cut the workers from SQS and PostgreSQL now; restore after ``seconds``."""
        return self._cut(
            [self.sqs, self.postgres], seconds, "partition", "workers cut from SQS and PostgreSQL"
        )

    def sqs_outage(self, seconds: float) -> FaultMark:
        """SQS unreachable for the workers and the executor now; back after ``seconds``."""
        return self._cut(
            [self.sqs, self.executor_sqs], seconds, "sqs_outage", "SQS unreachable for all"
        )

    def _cut(self, proxies: list[TcpProxy], seconds: float, kind: str, detail: str) -> FaultMark:
        # Restored on a timer: the caller goes on with the load meanwhile.
        for proxy in proxies:
            proxy.cut()

        def restore() -> None:
            for proxy in proxies:
                proxy.restore()

        self._timer = threading.Timer(seconds, restore)
        self._timer.daemon = True
        self._timer.start()
        return self.log.add(FaultMark(time.time(), kind, round(seconds, 2), detail=detail))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for proxy in (self.postgres, self.sqs, self.executor_sqs):
            proxy.close()


class DuplicatingRelay:
    """Moves every message from ``source_url`` to a queue of its own, ``copies`` times,
    keeping the bodies so that delivered messages can be sent again later."""

    def __init__(
        self,
        stack: LocalStack,
        log: FaultLog | None = None,
        *,
        copies: int = 2,
        seed: int = 0,
    ) -> None:
        client = sqs_client(endpoint_url=stack.sqs_endpoint)
        self.workers_queue_url, self.workers_dlq_url = create_queue_with_dlq(
            client,
            f"{stack.queue_url.rsplit('/', 1)[1]}-relay",
            visibility_timeout=30,
            message_retention=3600,
            max_receive_count=10,
        )
        self.log = log or FaultLog()
        self.bodies: list[str] = []
        self._source = SqsQueue(stack.queue_url, client=client)
        self._target = SqsQueue(self.workers_queue_url, client=client)
        self._copies = copies
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def start(self) -> DuplicatingRelay:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for message in self._source.receive(
                    max_messages=10, wait_seconds=1, visibility_timeout=30
                ):
                    for _ in range(self._copies):
                        self._target.send(message.body)
                    self.bodies.append(message.body)
                    self._source.delete(message.receipt_handle)
            except QueueUnavailable:
                self._stop.wait(1)

    def resend(self, count: int) -> FaultMark | None:
        """Send again ``count`` messages that were already delivered."""
        if not self.bodies:
            return None
        chosen = self._rng.sample(self.bodies, min(count, len(self.bodies)))
        sent = 0
        for body in chosen:
            try:
                self._target.send(body)
                sent += 1
            except QueueUnavailable:
                pass
        return self.log.add(
            FaultMark(time.time(), "duplicates", detail=f"{sent} delivered messages sent again")
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> DuplicatingRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
