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
This module is Dagster-free on the supervisor's side; the fork server's side imports
Dagster in its own process only.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dagster_taskiq.worker.config import CodeLocation

_PR_SET_PDEATHSIG = 1
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


def _prctl(option: int, value: int | bytes) -> bool:
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
    _prctl(_PR_SET_NAME, name.encode()[:15])


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


# -- the supervisor's side --------------------------------------------------------------


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
        if not already and not _prctl(_PR_SET_CHILD_SUBREAPER, 1):
            raise ForkServerError("this process could not become a child subreaper")
        try:
            return self._request({"fork": True}, child_fd)
        finally:
            if not already:
                _prctl(_PR_SET_CHILD_SUBREAPER, 0)

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
                "from dagster_taskiq.worker.fork_server import main; main()",
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


# -- the fork server's side -------------------------------------------------------------


@dataclass
class _Server:
    """What the fork server knows once it has imported everything."""

    sock: socket.socket
    supervisor_pid: int
    locations: tuple[CodeLocation, ...]
    instance_ref: Any  # the Dagster instance's configuration (an InstanceRef), or None
    watched: dict[str, int | None]  # files whose change makes it stale, and their mtimes


def main() -> None:
    """The fork server: ``python -c 'from ...fork_server import main; main()' FD``."""
    # No collection while importing: freed cycles would leave holes in pages that are
    # about to be shared, and collections in the children would write to them.
    gc.disable()
    sock = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sock.recv(MESSAGE_BYTES))
    supervisor_pid = int(config["supervisor_pid"])
    # Dies with the supervisor; SIGTERM and SIGINT are the supervisor's to act on.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor_pid:
        os._exit(70)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_process_name(FORK_SERVER_NAME)
    sys.path[:] = config["sys_path"]
    locations = tuple(CodeLocation(target) for target in config["locations"])

    started = time.monotonic()
    from dagster_taskiq.worker.step_process import preload, preload_code_locations

    instance_ref = preload()
    before = set(sys.modules)
    preload_code_locations(locations)
    watched = _watched_files(locations, [m for n, m in sys.modules.items() if n not in before])
    if instance_ref is not None:  # read once here: a changed dagster.yaml is read again
        yaml = os.path.join(os.environ["DAGSTER_HOME"], "dagster.yaml")
        watched[yaml] = _mtime(yaml)
    server = _Server(sock, supervisor_pid, locations, instance_ref, watched)
    refusal = fork_hazard(sock.fileno())
    gc.freeze()
    hello = {
        "pid": os.getpid(),
        "refusal": refusal,
        "preload_seconds": round(time.monotonic() - started, 3),
        "frozen_objects": gc.get_freeze_count(),
        "threads": threading.active_count(),
        "watched_files": len(watched),
    }
    sock.send(json.dumps(hello).encode())
    if refusal is not None:
        return
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 1)
        except OSError:
            return
        if not data:
            return  # the supervisor closed the socket, or is gone
        try:
            reply = _answer(server, fds)
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(reply).encode())


def _answer(server: _Server, fds: list[int]) -> dict[str, Any]:
    changed = _changed_file(server.watched)
    if changed is not None:
        return {"stale": f"{changed} changed since it was imported"}
    if len(fds) != 1:
        return {"error": "a fork request carries the step process's end of its pipe"}
    try:
        return {"pid": _fork(server, fds[0])}
    except OSError as e:
        return {"error": f"could not fork: {e}"}


def _fork(server: _Server, child_fd: int) -> int:
    """Fork a step process through an intermediate that exits at once; returns its pid."""
    report_read, report_write = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or each child would write what is buffered here once more
    gc.freeze()  # whatever this loop allocated since
    intermediate = os.fork()
    if intermediate == 0:
        code = 0
        try:
            os.close(report_read)
            parent = os.getpid()
            pid = os.fork()
            if pid == 0:
                os.close(report_write)
                _step_process(server, child_fd, parent)  # never returns
            os.write(report_write, str(pid).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(report_write)
    try:
        chunks = []
        while chunk := os.read(report_read, 32):
            chunks.append(chunk)
    finally:
        os.close(report_read)
        os.waitpid(intermediate, 0)
    if not chunks:
        raise OSError("the intermediate process did not fork")
    return int(b"".join(chunks))


def _step_process(server: _Server, child_fd: int, intermediate: int) -> None:
    """In the forked step process: its own state, then the loop; exits, never returns."""
    code = 0
    try:
        server.sock.close()  # the fork server's, not this process's
        signal.signal(signal.SIGINT, signal.default_int_handler)
        gc.enable()
        deadline = time.monotonic() + ADOPTION_TIMEOUT_SECONDS
        while os.getppid() == intermediate and time.monotonic() < deadline:
            time.sleep(0.0002)
        if os.getppid() != server.supervisor_pid:
            os._exit(70)  # not adopted: the supervisor is gone
        from multiprocessing.connection import Connection

        from dagster_taskiq.worker.step_process import run_step_process

        run_step_process(
            Connection(child_fd),
            server.supervisor_pid,
            server.locations,
            instance_ref=server.instance_ref,
        )
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        # As multiprocessing ends a forked child: no atexit handlers of the fork server's.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _installed_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    return tuple(os.path.realpath(paths[n]) + os.sep for n in names if n in paths)


def _watched_files(
    locations: tuple[CodeLocation, ...], modules: Iterable[Any]
) -> dict[str, int | None]:
    """The code locations' own files, and the files of what importing them imported but
    for installed libraries (a new image brings new ones), with their modification times."""
    files: list[str] = [location.target for location in locations if location.is_file]
    for location in locations:
        path = getattr(sys.modules.get(location.target), "__file__", None)
        if not location.is_file and isinstance(path, str):
            files.append(path)
    installed = _installed_dirs()
    for module in modules:
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and not os.path.realpath(path).startswith(installed):
            files.append(path)
    watched: dict[str, int | None] = {}
    for path in files[:MAX_WATCHED_FILES]:
        watched[path] = _mtime(path)
    return watched


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _changed_file(watched: dict[str, int | None]) -> str | None:
    for path, mtime in watched.items():
        if _mtime(path) != mtime:
            return path
    return None


def fork_hazard(control_fd: int) -> str | None:
    """Why this process must not fork step processes, or None: a thread (a child would
    have none of it, and inherit whatever locks it held) or an open socket (children
    would share the connection) left by importing the code locations."""
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        return f"importing the code locations started threads ({', '.join(threads)})"
    sockets = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc/self/fd"):
            fd = int(entry)
            if fd <= 2 or fd == control_fd:
                continue
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{entry}").startswith("socket:"):
                    sockets.append(fd)
    if sockets:
        return f"importing the code locations left {len(sockets)} socket(s) open (connections?)"
    return None
