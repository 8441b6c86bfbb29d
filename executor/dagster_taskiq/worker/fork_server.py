"""Step processes forked from a preloaded parent: the worker's fork server.

A spawned step process imports Dagster, dagster-postgres and the code locations on its
own: about 1.5 s before it can take a step, and some 100 MB that each step process holds
a copy of. The fork server is a single-threaded process that imports all that once and
forks step processes on request; their memory is the fork server's, shared copy-on-write,
until they write to it.

- The fork server is started by the supervisor (a new interpreter, not a fork of the
  supervisor, which has threads), dies with it (``PR_SET_PDEATHSIG``, and the end of its
  control socket), and never opens a database connection or starts a thread: it refuses
  to fork (and the supervisor spawns its step processes instead) when importing the code
  locations started a thread or opened a socket. It freezes its objects out of the
  garbage collector's reach (``gc.freeze``) before forking, so that a child's collections
  do not write to the pages it shares.
- A step process is forked through an intermediate that exits at once, so that it is
  adopted by the supervisor, a child subreaper while it waits for the fork: it is the
  supervisor's child, like a spawned one, and what holds for those holds for it (it dies
  with the supervisor, its exit status is the supervisor's to read, ``os.getppid()`` is
  the supervisor). Its per-process state (the Dagster instance and its connections,
  signal handling, the death signal, the compute-log mirror threads) is made after the
  fork.
- The pipe between the supervisor and a step process is made by the supervisor, as for a
  spawned one, and its end handed to the fork server with the request (SCM_RIGHTS).
- The supervisor starts a new fork server when its fork server died, and when a file of
  the code locations changed since it was imported (checked at every request): a
  recycled or replacement step process runs the code on disk, as a spawned one would.

Linux only (child subreapers, pidfds); elsewhere the supervisor spawns step processes.
This module is the supervisor's side, and Dagster-free; the fork server's own process is
``fork_server_process``, which imports Dagster in that process only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from dagster_taskiq.worker.config import CodeLocation

PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
FORK_SERVER_NAME = "taskiq-forksrv"  # the process name (comm) ps and top show
STEP_PROCESS_NAME = "taskiq-step"
MESSAGE_BYTES = 1 << 16
# How long a fork server has to import Dagster and the code locations.
START_TIMEOUT_SECONDS = 120.0
REQUEST_TIMEOUT_SECONDS = 30.0
# How long a forked step process waits to be adopted by the supervisor.
ADOPTION_TIMEOUT_SECONDS = 10.0
# The most files of the code locations watched for changes.
MAX_WATCHED_FILES = 2000


class ForkServerError(OSError):
    """The fork server could not fork a step process (it may have died)."""


class ForkRefused(ForkServerError):
    """The fork server will not fork this worker's code: step processes are spawned."""


class _NotSent(ForkServerError):
    """A request that never reached the fork server: asking a new one forks nothing twice."""


def prctl(option: int, value: int | bytes) -> bool:
    """Linux's prctl(2); False elsewhere or when it fails."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, value, 0, 0, 0)) == 0


def _is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
    return bool(flag.value)


def set_process_name(name: str) -> None:
    """The name ps, top and psutil show for this process (at most 15 bytes)."""
    prctl(_PR_SET_NAME, name.encode()[:15])


def supported() -> str | None:
    """None if step processes can be forked here, else why not."""
    if sys.platform != "linux":
        return "step processes are forked on Linux only"
    if not hasattr(os, "pidfd_open") or not hasattr(socket, "send_fds"):
        return "this Python has no pidfd_open or send_fds"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as e:
        return f"the kernel has no pidfds ({e})"
    return None


class ForkedProcess:
    """A step process forked by the fork server and adopted by this process: what a
    ``StepProcess`` uses of ``multiprocessing.Process``. Its sentinel is a pidfd, readable
    once the process has exited; signals go through it too, so that a signal never
    reaches another process that took the pid of a reaped one."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exitcode: int | None = None
        self._exited = False
        self._lock = threading.Lock()
        self._pidfd: int | None = os.pidfd_open(pid)

    @property
    def sentinel(self) -> int:
        fd = self._pidfd
        if fd is None:
            raise ValueError("the process handle is closed")
        return fd

    def _reap(self, *, block: bool) -> bool:
        """True once the process has exited; its exit code is then known, unless it was
        never adopted (the supervisor was not its parent, and cannot read it)."""
        with self._lock:
            if self._exited:
                return True
            try:
                pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                if not self._gone():
                    return False
            else:
                if pid == 0:
                    return False
                self.exitcode = os.waitstatus_to_exitcode(status)
            self._exited = True
            return True

    def _gone(self) -> bool:
        fd = self._pidfd
        if fd is None:
            return True
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)

    def join(self, timeout: float | None = None) -> None:
        fd = self._pidfd
        if self._exited or fd is None:
            return
        readable, _, _ = select.select([fd], [], [], timeout)
        if readable:
            self._reap(block=True)

    def is_alive(self) -> bool:
        return not self._reap(block=False)

    def send_signal(self, sig: int) -> None:
        with self._lock:
            fd = self._pidfd
            if not self._exited and fd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, sig)

    def close(self) -> None:
        """Release the pidfd once the process is reaped (a live one keeps it)."""
        with self._lock:
            if self._exited and self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None


class ForkServer:
    """The supervisor's handle on its fork server: started at the first request, and
    again after it died or its code changed. Thread-safe: one request at a time."""

    def __init__(self, locations: tuple[CodeLocation, ...]) -> None:
        self.locations = locations
        self.refusal: str | None = None  # set: this worker's step processes are spawned
        self.info: dict[str, Any] = {}  # what the running fork server said when ready
        self.starts = 0
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def fork(self, child_fd: int) -> ForkedProcess:
        """Fork a step process whose end of its pipe is ``child_fd``. Raises ForkRefused
        when this worker's code cannot be forked from, ForkServerError otherwise."""
        with self._lock:
            if self.refusal is not None:
                raise ForkRefused(self.refusal)
            if self._process is None or self._process.poll() is not None:
                self._start()
            try:
                reply = self._fork(child_fd)
            except _NotSent:
                self._stop()  # it died meanwhile: a new one, once
                self._start()
                reply = self._fork(child_fd)
            except ForkServerError:
                # It may have forked a process on this pipe before it failed: the caller
                # closes the pipe (such a process then exits) and asks again with another.
                self._stop()
                raise
            if "stale" in reply:
                self._stop()  # its code changed on disk: a new one imports it
                self._start()
                reply = self._fork(child_fd)
            if "pid" not in reply:
                raise ForkServerError(str(reply.get("error") or reply.get("stale") or reply))
            return ForkedProcess(int(reply["pid"]))

    def _fork(self, child_fd: int) -> dict[str, Any]:
        # The step process is adopted when its intermediate exits, before the answer: this
        # process is a child subreaper only meanwhile, so that the orphans of other
        # descendants (a step process's own subprocesses) still go to init, as before.
        already = _is_subreaper()
        if not already and not prctl(_PR_SET_CHILD_SUBREAPER, 1):
            raise ForkServerError("this process could not become a child subreaper")
        try:
            return self._request({"fork": True}, child_fd)
        finally:
            if not already:
                prctl(_PR_SET_CHILD_SUBREAPER, 0)

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> None:
        """A new fork server, ready to fork; raises ForkRefused or ForkServerError."""
        why = supported()
        if why is not None:
            self.refusal = why
            raise ForkRefused(why)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            command = [
                sys.executable,
                "-c",
                "from dagster_taskiq.worker.fork_server_process import main; main()",
                str(theirs.fileno()),
            ]
            # stdout and stderr are the supervisor's: the step processes print there, as
            # spawned ones do.
            self._process = subprocess.Popen(
                command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        self._socket = ours
        self.starts += 1
        config = {
            "supervisor_pid": os.getpid(),
            "sys_path": sys.path,
            "locations": [location.target for location in self.locations],
        }
        try:
            ours.sendall(json.dumps(config).encode())
            hello = self._receive(START_TIMEOUT_SECONDS)
        except ForkServerError:
            self._stop()
            raise
        self.info = hello
        if hello.get("refusal"):
            self.refusal = str(hello["refusal"])
            self._stop()
            raise ForkRefused(self.refusal)

    def _request(self, request: dict[str, Any], fd: int) -> dict[str, Any]:
        sock = self._socket
        if sock is None:
            raise _NotSent("no fork server")
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], [fd])
        except OSError as e:
            raise _NotSent(f"the fork server is gone ({e})") from e
        return self._receive(REQUEST_TIMEOUT_SECONDS)

    def _receive(self, timeout: float) -> dict[str, Any]:
        sock = self._socket
        process = self._process
        assert sock is not None and process is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ForkServerError(f"the fork server did not answer within {timeout:.0f} s")
            readable, _, _ = select.select([sock], [], [], min(remaining, 1.0))
            if readable:
                try:
                    data = sock.recv(MESSAGE_BYTES)
                except OSError as e:
                    raise ForkServerError(f"the fork server is gone ({e})") from e
                if not data:
                    process.wait(5)
                    raise ForkServerError(f"the fork server exited with code {process.returncode}")
                answer: dict[str, Any] = json.loads(data)
                return answer
            if process.poll() is not None:
                raise ForkServerError(f"the fork server exited with code {process.returncode}")

    def _stop(self) -> None:
        sock, process = self._socket, self._process
        self._socket = self._process = None
        if sock is not None:
            sock.close()  # the fork server exits when its control socket ends
        if process is not None:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
