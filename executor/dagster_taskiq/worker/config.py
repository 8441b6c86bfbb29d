"""Worker settings, from the command line or environment variables."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from dagster_taskiq.core.messages import DEFAULT_MAX_STEP_ARGS_BYTES
from dagster_taskiq.core.routing import DEFAULT_PRIORITY_RATIO
from dagster_taskiq.core.settings import DEFAULT_MAX_MESSAGE_BYTES

# How step processes start: forked from a preloaded fork server, or spawned (each imports
# Dagster and the code locations itself; see worker/fork_server.py).
STEP_PROCESS_FORK_SERVER = "fork-server"
STEP_PROCESS_SPAWN = "spawn"
STEP_PROCESS_STARTS = (STEP_PROCESS_FORK_SERVER, STEP_PROCESS_SPAWN)


def default_worker_id() -> str:
    task_arn = os.environ.get("ECS_TASK_ARN")
    base = task_arn.rsplit("/", 1)[-1] if task_arn else socket.gethostname()
    return f"{base}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class CodeLocation:
    """A module name or a Python file whose jobs this worker may run."""

    target: str

    @property
    def is_file(self) -> bool:
        return self.target.endswith(".py") or os.sep in self.target

    @classmethod
    def parse_many(cls, value: str | None) -> tuple[CodeLocation, ...]:
        if not value:
            return ()
        return tuple(cls(part.strip()) for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class WorkerSettings:
    queue_urls: tuple[str, ...]
    database_url: str
    code_locations: tuple[CodeLocation, ...]
    # Received from first (see routing.poll_order); a step may come from any of them.
    priority_queue_urls: tuple[str, ...] = ()
    priority_ratio: int = DEFAULT_PRIORITY_RATIO
    region: str | None = None
    endpoint_url: str | None = None
    concurrency: int = 2
    signing_key: str | None = None
    # Read into signing_key when the worker starts (see worker.run).
    signing_key_secret_arn: str | None = None
    max_steps_per_process: int = 1000
    step_process_start: str = STEP_PROCESS_FORK_SERVER
    wait_seconds: int = 20
    # How long a received message stays hidden before its first heartbeat, a third of
    # this after the claim, hides it for the step's lease. Short, so that a message
    # received by a worker that died before claiming it comes back soon.
    receive_visibility_seconds: int = 15
    stop_timeout: float = 100.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # The most a message's compressed step arguments may inflate to (see messages.decode).
    max_step_args_bytes: int = DEFAULT_MAX_STEP_ARGS_BYTES
    # Heartbeats run every lease/3, but at least this often, so a cancel lands quickly.
    max_heartbeat_interval: float = 10.0
    # Seconds a cancelled step gets to stop after its interrupt before it is killed.
    cancel_grace: float = 10.0
    worker_id: str = field(default_factory=default_worker_id)
    # With several queues, each idle round long-polls the first for this long (instead of
    # wait_seconds), so that a message on another queue waits at most about this long.
    multi_queue_wait_seconds: int = 1

    def __post_init__(self) -> None:
        if not self.queue_urls and not self.priority_queue_urls:
            raise ValueError("a worker needs at least one queue")
        overlap = set(self.queue_urls) & set(self.priority_queue_urls)
        if overlap:
            raise ValueError(f"a queue cannot be both normal and priority: {sorted(overlap)}")
        if self.step_process_start not in STEP_PROCESS_STARTS:
            raise ValueError(f"step processes start by one of {STEP_PROCESS_STARTS}")

    @property
    def all_queue_urls(self) -> tuple[str, ...]:
        return (*self.priority_queue_urls, *self.queue_urls)
