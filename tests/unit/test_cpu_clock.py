"""benchmarks.cpu: a process's CPU time and that of the children it has reaped (a recycled
step process, an ended database backend) are counted apart, and reported per step."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from benchmarks.cpu import _own, _reaped, per_step_ms

SPIN = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"


def test_the_time_of_reaped_children_is_counted_apart() -> None:
    # A shell runs a child that spins 0.5 s of CPU to its end (reaped), then becomes
    # ``sleep``, which spends nothing: what it has used since is its ended child's.
    spin = subprocess.list2cmdline([sys.executable, "-c", SPIN])
    root = subprocess.Popen(["/bin/sh", "-c", f"{spin}; exec sleep 30"])
    try:
        process = psutil.Process(root.pid)
        deadline = time.monotonic() + 20
        while process.name() != "sleep":
            assert time.monotonic() < deadline, "the spinning child did not end"
            time.sleep(0.05)
        assert _own(process) < 0.2
        assert 0.45 <= _reaped(process) < 5
    finally:
        root.kill()
        root.wait()


def test_per_step_milliseconds() -> None:
    rows = per_step_ms({"run worker": 1.0, "supervisor": 2.0}, steps=100)
    assert rows == {"run worker": 10.0, "supervisor": 20.0, "all": 30.0}
