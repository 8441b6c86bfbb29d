"""The step process's compute-log mirror: every byte to the file and to the stream, and
no process started for it."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dagster._core.storage import local_compute_log_manager
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager

from dagster_taskiq.worker.compute_logs import mirror_stream_to_file, mirror_with_threads


class Pipe:
    """A stream with a real file descriptor, read to the end on a thread."""

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        self.stream = os.fdopen(write_fd, "w", buffering=1)
        self._read_fd = read_fd
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self._read_fd, 4096):
            self._chunks.append(chunk)

    def close(self) -> bytes:
        self.stream.close()
        self._reader.join(10)
        os.close(self._read_fd)
        return b"".join(self._chunks)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    pipe = Pipe()
    yield pipe
    if not pipe.stream.closed:
        pipe.close()


def test_every_byte_reaches_the_file_and_the_stream(pipe: Pipe, tmp_path: Path) -> None:
    path = tmp_path / "step.out"
    lines = [f"line {i} {'x' * 200}\n" for i in range(2000)]  # far beyond a pipe's buffer
    with mirror_stream_to_file(pipe.stream, str(path)):
        for line in lines[:1000]:
            pipe.stream.write(line)
        pipe.stream.flush()
        # Written to the file descriptor itself, as a subprocess of the op would.
        fd = pipe.stream.fileno()
        for line in lines[1000:]:
            os.write(fd, line.encode())
    pipe.stream.write("after the capture\n")
    expected = "".join(lines).encode()

    assert path.read_bytes() == expected
    assert pipe.close() == expected + b"after the capture\n"


def _children() -> set[int]:
    # The test session's own (an emulator, a database server) are there before and after.
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_no_process_is_started(pipe: Pipe, tmp_path: Path) -> None:
    before = _children()
    with mirror_stream_to_file(pipe.stream, str(tmp_path / "step.out")):
        pipe.stream.write("hello\n")
        assert _children() - before == set()


def test_a_stream_that_is_gone_does_not_stop_the_capture(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # nobody reads the worker's stdout any more
    stream = os.fdopen(write_fd, "w", buffering=1)
    path = tmp_path / "step.out"
    with mirror_stream_to_file(stream, str(path)):
        os.write(stream.fileno(), b"still captured\n")
    stream.close()
    assert path.read_bytes() == b"still captured\n"


def test_dagsters_local_manager_captures_through_the_thread(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Put back Dagster's own mirror when the test ends, whatever it installs.
    name = "mirror_stream_to_file"
    monkeypatch.setattr(local_compute_log_manager, name, getattr(local_compute_log_manager, name))
    mirror_with_threads()
    assert getattr(local_compute_log_manager, name) is mirror_stream_to_file

    manager = LocalComputeLogManager(str(tmp_path))
    log_key = ["run", "compute_logs", "abcdefgh"]
    before = _children()
    with manager.capture_logs(log_key):
        assert _children() - before == set()
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)

    assert manager.is_capture_complete(log_key)
    data = manager.get_log_data(log_key)
    assert data.stdout == b"to stdout\n"
    assert data.stderr == b"to stderr\n"
    mirrored = capfd.readouterr()
    assert "to stdout" in mirrored.out and "to stderr" in mirrored.err
