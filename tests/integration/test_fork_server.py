"""Step processes forked from the worker's fork server, on a real Dagster instance
(PostgreSQL): each is the supervisor's child with its own state and connections, none
inherits a thread or a connection, and the fork server is replaced when it dies or its
code changes. This test process plays the supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dagster import DagsterInstance, execute_job, reconstructable

from dagster_taskiq.core.messages import StepMessage
from dagster_taskiq.local.stack import LocalStack
from dagster_taskiq.worker import fork_server
from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.fork_server import (
    FORK_SERVER_NAME,
    STEP_PROCESS_NAME,
    ForkServer,
)
from dagster_taskiq.worker.step_process import StepProcess
from tests import jobs
from tests.conftest import start_workers
from tests.helpers import wait_for
from tests.hostile import module_origin, step_args

pytestmark = pytest.mark.skipif(
    fork_server.supported() is not None, reason=str(fork_server.supported())
)

LOCATIONS = (CodeLocation("tests.jobs"),)


@pytest.fixture
def server(stack: LocalStack) -> Iterator[ForkServer]:
    forks = ForkServer(LOCATIONS)
    yield forks
    forks.stop()


@pytest.fixture
def started() -> Iterator[list[StepProcess]]:
    processes: list[StepProcess] = []
    yield processes
    for process in processes:
        process.stop()


def _start(server: ForkServer, started: list[StepProcess]) -> StepProcess:
    process = StepProcess.start(server.locations, fork_server=server)
    started.append(process)
    return process


def _read_a_run(process: StepProcess) -> None:
    """Vet a message for a run that does not exist: the step process reads ahead (a run
    read on its pooled connection) after it answers."""
    run_id = str(uuid.uuid4())
    args = step_args(run_id, ["hello"], module_origin("tests.jobs"))
    vetting = process.vet(StepMessage.new(run_id, "hello", 0, args, 60))
    assert vetting.malformed is None and vetting.refusal is None


def _sockets(pid: int) -> set[str]:
    links = set()
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if link.startswith("socket:"):
            links.add(link)
    return links


def test_step_processes_are_forked_and_each_makes_its_own_state(
    server: ForkServer, started: list[StepProcess]
) -> None:
    first, second = _start(server, started), _start(server, started)

    assert first.started_by == second.started_by == "fork-server"
    assert server.pid is not None
    parent = psutil.Process(server.pid)
    assert parent.name() == FORK_SERVER_NAME
    assert server.info["frozen_objects"] > 0, "gc.freeze() before forking"
    # Single-threaded; its only socket is the one to this process: no connection.
    assert parent.num_threads() == 1 and server.info["threads"] == 1
    assert len(_sockets(server.pid)) == 1
    for process in (first, second):
        child = psutil.Process(process.pid)
        assert child.ppid() == os.getpid(), "adopted by the supervisor, as a spawned one"
        assert child.name() == STEP_PROCESS_NAME
        # Its main thread and the thread that watches the supervisor, both its own.
        assert child.num_threads() == 2
    assert not fork_server._is_subreaper(), "a child subreaper only while forking"

    after = {}
    for process in (first, second):
        before = _sockets(process.pid)
        _read_a_run(process)  # it reads after it answers: wait for its new connection
        after[process.pid] = wait_for(
            lambda p=process, b=before: _sockets(p.pid) if _sockets(p.pid) - b else None,  # type: ignore[misc]
            timeout=10,
            what="a database connection of its own, opened after the fork",
        )
    assert not after[first.pid] & after[second.pid], "no socket shared between step processes"
    assert not (after[first.pid] | after[second.pid]) & _sockets(server.pid)


def test_a_killed_step_process_is_replaced_from_the_same_fork_server(
    server: ForkServer, started: list[StepProcess]
) -> None:
    victim = _start(server, started)
    fork_server_pid = server.pid
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: not victim.alive, timeout=10, what="the step process to die")
    assert victim.process.exitcode == -signal.SIGKILL

    replacement = _start(server, started)
    assert replacement.pid != victim.pid
    assert server.pid == fork_server_pid and server.starts == 1
    _read_a_run(replacement)
    assert replacement.ready_seconds < 5


def test_a_dead_fork_server_is_replaced_and_its_step_processes_live_on(
    server: ForkServer, started: list[StepProcess]
) -> None:
    running = _start(server, started)
    first_server = server.pid
    assert first_server is not None
    os.kill(first_server, signal.SIGKILL)
    wait_for(lambda: not _alive(first_server), timeout=10, what="its end")

    assert running.alive
    _read_a_run(running)  # not the fork server's child: unaffected
    replacement = _start(server, started)
    assert server.pid not in (None, first_server) and server.starts == 2
    assert replacement.started_by == "fork-server"
    _read_a_run(replacement)


def test_a_changed_code_location_file_starts_the_fork_server(
    server: ForkServer, started: list[StepProcess], tmp_path: Path
) -> None:
    location = tmp_path / "location.py"
    location.write_text("from dagster import op\n\n\n@op\ndef hello() -> int:\n    return 1\n")
    server.locations = (CodeLocation(str(location)),)
    _start(server, started)
    first_server = server.pid

    _start(server, started)
    assert server.pid == first_server, "nothing changed: the same fork server"
    stat = location.stat()
    os.utime(location, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = _start(server, started)
    assert server.pid != first_server and server.starts == 2
    assert changed.started_by == "fork-server"


def test_code_that_starts_a_thread_at_import_is_spawned_instead(
    server: ForkServer, started: list[StepProcess], tmp_path: Path
) -> None:
    location = tmp_path / "threaded.py"
    location.write_text(
        "import threading, time\n\n"
        "threading.Thread(target=time.sleep, args=(3600,), name='poller', daemon=True).start()\n"
    )
    server.locations = (CodeLocation(str(location)),)
    process = _start(server, started)

    assert process.started_by == "spawn"
    assert server.refusal is not None and "poller" in server.refusal
    assert server.pid is None, "the fork server that refused is gone"


@pytest.mark.parametrize(
    ("setup", "hazard"),
    [
        ("", "None"),
        ("import socket; s = socket.socket()", "socket"),
        ("import socket; s = socket.socket(); control = s.fileno()", "None"),
        (
            "import threading, time\n"
            "threading.Thread(target=time.sleep, args=(60,), name='poller').start()",
            "poller",
        ),
    ],
    ids=["clean", "socket", "control-socket", "thread"],
)
def test_fork_hazards_are_threads_and_open_sockets(setup: str, hazard: str) -> None:
    code = (
        f"control = -1\n{setup}\n"
        "from dagster_taskiq.worker.fork_server_process import fork_hazard\n"
        "print(fork_hazard(control))\n"
        "import os; os._exit(0)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert hazard in found


SUPERVISOR = textwrap.dedent(
    """
    import sys, time
    from dagster_taskiq.worker.config import CodeLocation
    from dagster_taskiq.worker.fork_server import ForkServer
    from dagster_taskiq.worker.step_process import StepProcess

    server = ForkServer((CodeLocation("tests.jobs"),))
    process = StepProcess.start(server.locations, fork_server=server)
    print(server.pid, process.pid, flush=True)
    time.sleep(600)
    """
)


def test_the_fork_server_and_its_step_processes_die_with_the_supervisor(
    stack: LocalStack,
) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE, text=True
    )
    try:
        assert supervisor.stdout is not None
        server_pid, step_pid = (int(pid) for pid in supervisor.stdout.readline().split())
        assert psutil.Process(step_pid).ppid() == supervisor.pid
        supervisor.kill()  # nothing but the supervisor
        supervisor.wait(10)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and any(map(_alive, (server_pid, step_pid))):
            time.sleep(0.05)
        assert not _alive(server_pid), "the fork server outlived its supervisor"
        assert not _alive(step_pid), "the step process outlived its supervisor"
    finally:
        if supervisor.poll() is None:
            supervisor.kill()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_worker_forks_its_step_processes_and_recycles_them_from_the_fork_server(
    stack: LocalStack, instance: DagsterInstance
) -> None:
    pool = start_workers(stack, 1, args=("--max-steps-per-process", "1"), concurrency=1)
    result = execute_job(reconstructable(jobs.outputs_job), instance=instance)
    assert result.success
    rows = jobs.execution_rows(result.run_id)
    assert len({r["process_pid"] for r in rows}) == 3, "a new step process after every step"
    (worker,) = pool.processes
    assert {r["worker_pid"] for r in rows} == {worker.pid}, "each the supervisor's child"

    def ready() -> list[dict[str, object]] | None:
        lines = [json.loads(x) for x in pool.logs().splitlines() if x.startswith("{")]
        found = [x for x in lines if x.get("message") == "Step process ready"]
        return found if len(found) >= 4 else None  # the first, and one after each step

    records = wait_for(ready, timeout=30, what="the step processes' starts")
    assert [r["start"] for r in records[:4]] == ["first", "recycled", "recycled", "recycled"]
    assert {r["started_by"] for r in records} == {"fork-server"}
