"""A warm step process: imports Dagster and the code locations once, then runs one step
at a time on its main thread, where Dagster's interrupt handling works.

The supervisor talks to it over a pipe: a StepTask in, a StepResult out; or, before a
message is claimed, a VetRequest in, a Vetting out (the supervisor itself does not import
Dagster, which reads the step arguments). SIGINT
interrupts the running step (cancellation); SIGKILL ends it without a word (lease lost,
shutdown release), so that no ending is written for an attempt another worker will run.
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

from dagster_taskiq.worker.config import CodeLocation
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
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    # Elsewhere, and for a parent that died before prctl: look twice a second.
    while True:
        if os.getppid() != parent_pid:
            os._exit(70)
        time.sleep(0.5)


def _preload(locations: tuple[CodeLocation, ...]) -> None:
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


def main(conn: Connection, parent_pid: int, locations: tuple[CodeLocation, ...]) -> None:
    _die_with_parent(parent_pid)
    # SIGTERM goes to the supervisor, which decides when steps stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    from dagster import DagsterInstance
    from dagster._utils.interrupts import capture_interrupts, pop_captured_interrupt

    from dagster_taskiq.worker.compute_logs import mirror_with_threads
    from dagster_taskiq.worker.execution import ReadAhead, execute, read_ahead, vet
    from dagster_taskiq.worker.plans import PlanCache
    from dagster_taskiq.worker.storage import (
        keep_connections,
        rewrite_cut_events,
        ride_out_database_outages,
    )

    ride_out_database_outages()
    mirror_with_threads()
    instance = DagsterInstance.get()
    keep_connections(instance)
    rewrite_cut_events(instance)
    _preload(locations)
    plans = PlanCache()
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
                vetting = vet(task.step_args, locations)
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

    @classmethod
    def start(
        cls, locations: tuple[CodeLocation, ...], *, ready_timeout: float = 120.0
    ) -> StepProcess:
        parent_conn, child_conn = _spawn.Pipe()
        process = _spawn.Process(
            target=main,
            args=(child_conn, os.getpid(), locations),
            name="dagster-taskiq-step",
            daemon=True,
        )
        process.start()
        child_conn.close()
        handle = cls(process=process, conn=parent_conn)
        ready = multiprocessing.connection.wait([parent_conn, process.sentinel], ready_timeout)
        if parent_conn not in ready:
            handle.kill()
            raise handle._died()
        try:
            parent_conn.recv()
        except EOFError as e:
            raise handle._died() from e
        return handle

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def run(self, task: StepTask) -> StepResult:
        """Run the task; returns its result or raises StepProcessDied."""
        self.steps_run += 1
        result: StepResult = self._ask(task)
        return result

    def vet(self, step_args: str) -> Vetting:
        """Have the step process read a message's step arguments; raises StepProcessDied."""
        vetting: Vetting = self._ask(VetRequest(step_args))
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
        if self.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
        self.conn.close()

    @property
    def alive(self) -> bool:
        return bool(self.process.is_alive())
