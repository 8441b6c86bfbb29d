"""The fork server's own process: import Dagster and the code locations once, then fork
step processes on the supervisor's request (see ``fork_server`` for the design).

Started by ``ForkServer`` as ``python -c 'from ...fork_server_process import main; main()'
FD``; nothing else imports it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import sys
import sysconfig
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.fork_server import (
    ADOPTION_TIMEOUT_SECONDS,
    FORK_SERVER_NAME,
    MAX_WATCHED_FILES,
    MESSAGE_BYTES,
    PR_SET_PDEATHSIG,
    prctl,
    set_process_name,
)


@dataclass
class _Server:
    """What the fork server knows once it has imported everything."""

    sock: socket.socket
    supervisor_pid: int
    locations: tuple[CodeLocation, ...]
    instance_ref: Any  # the Dagster instance's configuration (an InstanceRef), or None
    watched: dict[str, int | None]  # files whose change makes it stale, and their mtimes


def main() -> None:
    """The fork server: ``python -c 'from ...fork_server_process import main; main()' FD``."""
    # No collection while importing: freed cycles would leave holes in pages that are
    # about to be shared, and collections in the children would write to them.
    gc.disable()
    sock = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sock.recv(MESSAGE_BYTES))
    supervisor_pid = int(config["supervisor_pid"])
    # Dies with the supervisor; SIGTERM and SIGINT are the supervisor's to act on.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
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
