"""Where a workload's CPU goes on this executor: ``python -m benchmarks.cpu fanout_100``.

Runs the workload on the local stack (one warm worker with 2 step processes, as
``make bench`` does) after an untimed warm-up, and prints the CPU time each part used
during the timed runs, per step: the run worker (this process), the worker's supervisor,
its step processes, anything those start (counted when they exit), the SQS emulator and
PostgreSQL (its server processes, ended ones included). On a 2-core machine their sum
over the wall time says how near the run is to being CPU-bound.

``make bench`` reports the same per step for ``fanout_100`` and ``fanout_1000``
(``CpuClock``): the same cost per step at both sizes says the larger run cannot take less
time per step on this machine, whatever it overlaps.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.harness import bench_stack, timed_run

STEPS = {"fanout_100": 101, "chain_20": 20, "sleep_20": 20, "fanout_1000": 1001}


def _times(process: psutil.Process) -> Any:
    try:
        return process.cpu_times()
    except psutil.NoSuchProcess:
        return None


def _own(process: psutil.Process) -> float:
    """CPU seconds the process itself has used."""
    times = _times(process)
    return 0.0 if times is None else float(times.user + times.system)


def _reaped(process: psutil.Process) -> float:
    """CPU seconds of the children it has ended and reaped (no longer alive)."""
    times = _times(process)
    return 0.0 if times is None else float(times.children_user + times.children_system)


def _stack_processes(root: Path) -> tuple[int, int | None]:
    """The SQS emulator this process started, and the PostgreSQL server on ``root``."""
    emulator = next(
        p.pid
        for p in psutil.Process().children()
        if "dagster_taskiq.local.sqs_emulator" in " ".join(p.cmdline())
    )
    postmaster = None
    for process in psutil.process_iter(["name", "cmdline", "ppid"]):
        command = " ".join(process.info["cmdline"] or [])
        if process.info["name"] == "postgres" and str(root) in command:
            postmaster = process.pid
    return emulator, postmaster


def snapshot(worker_pid: int, emulator_pid: int, postgres_pid: int | None) -> dict[str, float]:
    worker = psutil.Process(worker_pid)
    emulator = psutil.Process(emulator_pid)
    step_processes = [
        p for p in worker.children() if "resource_tracker" not in " ".join(p.cmdline())
    ]
    parts = {
        "run worker": _own(psutil.Process()),
        "supervisor": _own(worker),
        # Recycled step processes, once the supervisor (their subreaper) reaped them.
        "ended step processes": _reaped(worker),
        "step processes": sum(_own(p) for p in step_processes),
        "started by step processes": sum(_reaped(p) for p in step_processes),
        "SQS emulator": _own(emulator) + _reaped(emulator),
    }
    if postgres_pid is not None:
        server = psutil.Process(postgres_pid)
        parts["PostgreSQL"] = (
            _own(server) + _reaped(server) + sum(_own(p) for p in server.children())
        )
    return parts


@dataclass
class CpuClock:
    """CPU seconds of each part of a local stack's run since ``start``."""

    pids: tuple[int, int, int | None]  # the worker's supervisor, the emulator, PostgreSQL
    started: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_stack(cls, root: Path, worker_pid: int) -> CpuClock:
        return cls((worker_pid, *_stack_processes(root)))

    def start(self) -> None:
        self.started = snapshot(*self.pids)

    def elapsed(self) -> dict[str, float]:
        now = snapshot(*self.pids)
        return {part: now[part] - self.started.get(part, 0.0) for part in now}


def per_step_ms(used: dict[str, float], steps: int) -> dict[str, float]:
    """Milliseconds of CPU per step, by part and in all."""
    rows = {part: round(1000 * seconds / steps, 1) for part, seconds in used.items()}
    rows["all"] = round(1000 * sum(used.values()) / steps, 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workload", choices=sorted(STEPS))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with contextlib.ExitStack() as exits:
        root, stack, instance = bench_stack(exits)
        pool = stack.worker_pool(concurrency=2)
        pool.scale_to(1)
        timed_run(instance, args.workload, "taskiq", {})  # warm-up
        # The steps of the warm-up are recorded a moment after the run ends.
        time.sleep(2)
        clock = CpuClock.for_stack(root, pool.processes[0].pid)
        clock.start()
        wall = sum(timed_run(instance, args.workload, "taskiq", {}) for _ in range(args.runs))
        time.sleep(2)
        used = clock.elapsed()

    steps = STEPS[args.workload] * args.runs
    print(f"{args.workload}: {args.runs} runs, {steps} steps, {wall:.2f} s of wall time")
    print(f"{'part':<28}{'CPU s':>9}{'ms per step':>14}")
    for part, seconds in [*used.items(), ("all", sum(used.values()))]:
        print(f"{part:<28}{seconds:>9.2f}{seconds / steps * 1000:>14.1f}")
    print(
        f"CPU used / (wall time x {os.cpu_count()} cores): "
        f"{sum(used.values()) / (wall * (os.cpu_count() or 1)):.0%}"
    )


if __name__ == "__main__":
    main()
