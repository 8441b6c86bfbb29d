"""A warm step process: imports Dagster and the code locations once, then runs one step
at a time on its main thread, where Dagster's interrupt handling works.

The supervisor talks to it over a pipe: a StepTask in, a StepResult out; or, before a
message is claimed, a VetRequest in, a Vetting out (the supervisor itself does not import
Dagster, which reads the step arguments). SIGINT
interrupts the running step (cancellation); SIGKILL ends it without a word (lease lost,
shutdown release), so that no ending is written for an attempt another worker will run.

A step process is forked from the worker's fork server, which has imported all that
already (``worker/fork_server.py``), or spawned, and then imports it itself. Either way
it is the supervisor's child, and makes its own Dagster instance and connections.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from dagster_taskiq.core.messages import StepMessage
from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.fork_server import (
    STEP_PROCESS_NAME,
    ForkedProcess,
    ForkRefused,
    ForkServer,
    set_process_name,
)
from dagster_taskiq.worker.tasks import StepResult, StepTask, VetRequest, Vetting

_spawn = multiprocessing.get_context("spawn")


class StepProcessDied(Exception):
    def __init__(self, exitcode: int | None) -> None:
        super().__init__(f"the step process exited with code {exitcode}")
        self.exitcode = exitcode


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Die with the supervisor: a SIGKILLed worker must not leave a step running, not even
    for the moment it would take to write one more record."""
    if sys.platform == "linux":
        # The kernel sends SIGKILL the instant the parent dies.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(70)  # it died before prctl
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    # Elsewhere, and for a parent that died before prctl: look twice a second.
    while True:
        if os.getppid() != parent_pid:
            os._exit(70)
        time.sleep(0.5)


# What Dagster imports on its way to a step's first event, but not with ``import dagster``
# (the modules a first step added to ``sys.modules``). Imported before a step process is
# forked, they are shared, and a new step process does not wait for them.
LAZY_IMPORTS = (
    "dagster._core.instance.factory",
    "dagster._core.secrets.env_file",
    "dagster._core.secrets.loader",
    "dagster._core.definitions.repository_definition.repository_data_builder",
    "dagster._core.storage.sqlite_storage",
    "dagster._core.system_config.composite_descent",
    "dagster._core.utility_ops",
    "dagster._core.workspace.autodiscovery",
    "dagster._utils.temp_file",
    "dagster._utils.test.definitions",
    "upath.core",  # the paths of the artifact storage and the filesystem IO manager
)


def preload() -> Any:
    """What a step process imports before its first step, but for the code locations:
    Dagster, the instance's storage classes, this package's step-running modules; and the
    checks of the patches it applies. Returns the instance's configuration read from
    DAGSTER_HOME (an InstanceRef), or None."""
    import importlib

    import dagster  # noqa: F401
    from dagster._utils import interrupts  # noqa: F401

    from dagster_taskiq import patches
    from dagster_taskiq.worker import compute_logs, execution, plans, step_storage  # noqa: F401

    for name in LAZY_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    patches.require_all(patches.STEP_PROCESS_PATCHES)
    return _instance_ref()


def _instance_ref() -> Any:
    # The instance's configuration, and the classes of its storage, run launcher, etc.
    # (dagster-postgres and its driver): imported, not instantiated, which would connect.
    import importlib

    from dagster._core.instance.ref import InstanceRef
    from dagster._serdes import ConfigurableClassData

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return None
    try:
        ref = InstanceRef.from_dir(home)
        for data in ref._asdict().values():
            if isinstance(data, ConfigurableClassData):
                importlib.import_module(data.module_name)
        if "dagster_postgres" in sys.modules:
            for name in ("sqlalchemy.dialects.postgresql.psycopg2", "psycopg2.extras"):
                importlib.import_module(name)
    except Exception:
        return None  # DagsterInstance.get() in the step process says what is wrong
    return ref


def preload_code_locations(locations: tuple[CodeLocation, ...]) -> None:
    import importlib

    from dagster._core.code_pointer import load_python_file

    for location in locations:
        try:
            if location.is_file:
                load_python_file(location.target, None)
            else:
                importlib.import_module(location.target)
        except Exception as e:
            print(f"dagster-taskiq: could not preload code location {location.target}: {e}")


def answer_vet(request: VetRequest, locations: tuple[CodeLocation, ...]) -> Vetting:
    """The step process's answer to a VetRequest. Whatever the message holds, it is an
    answer (a malformed one at worst), never the end of the step process: a message that
    killed it would do so again on each of its deliveries, unrecorded."""
    from dagster_taskiq.worker.execution import vet

    try:
        return vet(request, locations)
    except Exception as e:
        return Vetting(malformed=f"step arguments could not be vetted ({type(e).__name__})")


def main(conn: Connection, parent_pid: int, locations: tuple[CodeLocation, ...]) -> None:
    """A spawned step process."""
    run_step_process(conn, parent_pid, locations, imported=False)


def run_step_process(
    conn: Connection,
    parent_pid: int,
    locations: tuple[CodeLocation, ...],
    *,
    imported: bool = True,
    instance_ref: Any = None,
) -> None:
    """The step process, once it runs its own interpreter (spawned) or is forked from the
    fork server (``imported``: Dagster and the code locations are there already)."""
    _die_with_parent(parent_pid)
    # SIGTERM goes to the supervisor, which decides when steps stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_process_name(STEP_PROCESS_NAME)
    if not imported:
        instance_ref = preload()
        preload_code_locations(locations)

    from dagster import DagsterInstance
    from dagster._utils.interrupts import capture_interrupts, pop_captured_interrupt

    from dagster_taskiq.worker.compute_logs import mirror_with_threads
    from dagster_taskiq.worker.execution import ReadAhead, execute, read_ahead
    from dagster_taskiq.worker.plans import PlanCache
    from dagster_taskiq.worker.step_storage import (
        keep_connections,
        rewrite_cut_events,
        ride_out_database_outages,
    )

    ride_out_database_outages()
    mirror_with_threads()
    # Read from DAGSTER_HOME by ``preload`` (DagsterInstance.get() reads it the same way).
    instance = DagsterInstance.from_ref(instance_ref) if instance_ref else DagsterInstance.get()
    keep_connections(instance)
    rewrite_cut_events(instance)
    plans = PlanCache(locations)
    ahead: ReadAhead | None = None
    conn.send("ready")
    with capture_interrupts():
        while True:
            try:
                task: StepTask | VetRequest | None = conn.recv()
            except (EOFError, OSError):
                return
            if task is None:
                return
            if isinstance(task, VetRequest):
                vetting = answer_vet(task, locations)
                conn.send(vetting)
                # While the supervisor claims the message: its run and its step's plan.
                accepted = vetting.malformed is None and vetting.refusal is None
                ahead = read_ahead(instance, task.step_args, plans) if accepted else None
                continue
            pop_captured_interrupt()  # an interrupt meant for the previous step
            conn.send(execute(instance, task, plans, ahead))
            ahead = None


@dataclass
class StepProcess:
    """The supervisor's handle on one step process."""

    process: Any
    conn: Connection
    steps_run: int = 0
    started_by: str = "spawn"  # or "fork-server"
    ready_seconds: float = 0.0  # from the request to its "ready"

    @classmethod
    def start(
        cls,
        locations: tuple[CodeLocation, ...],
        *,
        ready_timeout: float = 120.0,
        fork_server: ForkServer | None = None,
    ) -> StepProcess:
        """A step process, ready for a step: forked from ``fork_server`` unless it refuses
        this worker's code (then spawned); raises StepProcessDied or OSError."""
        requested = time.monotonic()
        parent_conn, child_conn = _spawn.Pipe()
        process: Any = None
        try:
            if fork_server is not None and fork_server.refusal is None:
                with contextlib.suppress(ForkRefused):
                    process = fork_server.fork(child_conn.fileno())
            if process is None:
                process = _spawn.Process(
                    target=main,
                    args=(child_conn, os.getpid(), locations),
                    name="dagster-taskiq-step",
                    daemon=True,
                )
                process.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        started_by = "fork-server" if isinstance(process, ForkedProcess) else "spawn"
        handle = cls(process=process, conn=parent_conn, started_by=started_by)
        ready = multiprocessing.connection.wait([parent_conn, process.sentinel], ready_timeout)
        if parent_conn not in ready:
            handle.kill()
            raise handle._died()
        try:
            parent_conn.recv()
        except EOFError as e:
            raise handle._died() from e
        handle.ready_seconds = time.monotonic() - requested
        return handle

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def run(self, task: StepTask) -> StepResult:
        """Run the task; returns its result or raises StepProcessDied."""
        self.steps_run += 1
        result: StepResult = self._ask(task)
        return result

    def vet(self, message: StepMessage) -> Vetting:
        """Have the step process read a message's step arguments; raises StepProcessDied."""
        request = VetRequest(message.step_args, run_id=message.run_id, step_key=message.step_key)
        vetting: Vetting = self._ask(request)
        return vetting

    def _ask(self, request: StepTask | VetRequest) -> Any:
        try:
            self.conn.send(request)
            while True:
                ready = multiprocessing.connection.wait([self.conn, self.process.sentinel])
                if self.conn in ready:
                    return self.conn.recv()
                if self.process.sentinel in ready:
                    raise self._died()
        except (EOFError, OSError, BrokenPipeError) as e:
            raise self._died() from e

    def _died(self) -> StepProcessDied:
        # The pipe and the sentinel tell of an exit before the process can be reaped: wait
        # for that, so that its exit code is known and ``alive`` is False from here on. A
        # slot that still saw it alive would hand it the next message, and that delivery
        # would be spent without a claim (one fewer before the dead-letter queue).
        self.process.join(5)
        return StepProcessDied(self.process.exitcode)

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self.process.join(10)

    def _signal(self, sig: int) -> None:
        if isinstance(self.process, ForkedProcess):
            self.process.send_signal(sig)  # through its pidfd: never to a reused pid
        elif self.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
        self.conn.close()
        if isinstance(self.process, ForkedProcess):
            self.process.close()

    @property
    def alive(self) -> bool:
        return bool(self.process.is_alive())
